"""`textune serve RUN`: an HTTP prediction service (FastAPI on uvicorn).

    POST /predict  {"texts": ["...", ...]}  -> {"labels": [...], "probabilities": [{label: p}]}
    GET  /health   -> {"status": "ok"}
    GET  /info     -> model, labels, limits and the run's metrics
    GET  /docs     -> OpenAPI docs

Concurrent requests are micro-batched: the first request waits at most ``batch_wait_ms`` for
others, and all their texts go through one forward pass (up to ``max_batch`` texts). Inference
runs on one worker thread, so the event loop keeps accepting and answering while it computes.
Bad input never reaches the model: malformed JSON or non-UTF-8 -> 400, a body over the limit
-> 413, too many texts -> 413, wrong types / empty list / a text over the limit -> 422; every
error is a JSON ``{"error": ...}``.
"""


import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_texts: int = 256
    max_chars: int = 20_000
    max_body: int = 4 * 2**20
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    microbatch: bool = True


class BadRequest(Exception):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status, self.msg = status, msg


def parse_body(body: bytes, limits: Limits) -> list[str]:
    """The texts of a /predict body, or BadRequest with the status to answer."""
    if len(body) > limits.max_body:
        raise BadRequest(413, f"body is {len(body)} bytes; the limit is {limits.max_body}")
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRequest(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except RecursionError:
        raise BadRequest(400, "JSON nested too deeply") from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise BadRequest(422, 'expected a JSON object {"texts": ["...", ...]}')
    texts = payload["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, '"texts" must be a list of strings')
    if not texts:
        raise BadRequest(422, '"texts" is empty; send at least one text')
    if len(texts) > limits.max_texts:
        raise BadRequest(413, f"{len(texts)} texts; the limit is {limits.max_texts} per request")
    for i, t in enumerate(texts):
        if len(t) > limits.max_chars:
            raise BadRequest(422, f"texts[{i}] has {len(t)} characters; the limit is "
                                  f"{limits.max_chars}")
    return texts


class MicroBatcher:
    """Collects concurrent requests for a short, bounded wait into one forward pass."""

    def __init__(self, predict, limits: Limits):
        self.predict = predict  # list[str] -> np.ndarray of probabilities
        self.limits = limits
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textune-infer")
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.texts = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def submit(self, texts: list[str]):
        loop = asyncio.get_running_loop()
        if not self.limits.microbatch:
            return await loop.run_in_executor(self.executor, self.predict, texts)
        fut = loop.create_future()
        await self.queue.put((texts, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0][0])
            deadline = loop.time() + self.limits.batch_wait_ms / 1000
            while n < self.limits.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                n += len(item[0])
            texts = [t for ts, _ in items for t in ts]
            try:
                probs = await loop.run_in_executor(self.executor, self.predict, texts)
            except Exception as e:  # the model failed: every waiting request learns why
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.texts += len(texts)
            i = 0
            for ts, fut in items:
                if not fut.done():
                    fut.set_result(probs[i:i + len(ts)])
                i += len(ts)


def create_app(clf, run: Path, limits: Limits | None = None):
    """The ASGI app around a loaded :class:`textune.Classifier` (or anything with
    ``predict_proba(texts)``, ``decide(probs)`` and ``labels``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    metrics = {}
    if (run / "metrics.json").exists():
        m = json.loads((run / "metrics.json").read_text())
        metrics = {k: m.get(k) for k in ("accuracy", "macro_f1", "split", "n_eval", "strategy",
                                         "model", "max_length")}
    batcher = MicroBatcher(lambda texts: clf.predict_proba(texts), limits)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="textune", description=f"text classifier from {run}", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body):
            return error(413, f"body over the limit of {limits.max_body} bytes")
        try:
            return await call_next(request)
        except Exception as e:  # never die on a request; log it, answer 500
            log.exception("request failed")
            return error(500, f"internal error: {type(e).__name__}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {"run": str(run), "labels": list(clf.names), "metrics": metrics,
                "limits": limits.__dict__, "batches": batcher.batches,
                "texts_predicted": batcher.texts}

    @app.post("/predict", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["texts"], "properties": {
            "texts": {"type": "array", "items": {"type": "string"},
                      "maxItems": limits.max_texts}}},
            "example": {"texts": ["a gorgeous, moving film"]}}}}})
    async def predict(request: Request):
        body = bytearray()
        async for chunk in request.stream():  # count as it arrives: no unbounded buffering
            body += chunk
            if len(body) > limits.max_body:
                return error(413, f"body over the limit of {limits.max_body} bytes")
        try:
            texts = parse_body(bytes(body), limits)
        except BadRequest as e:
            return error(e.status, e.msg)
        probs = await batcher.submit(texts)
        labels = list(clf.names)
        return {"labels": clf.decide(probs),
                "probabilities": [{lab: round(float(p), 6) for lab, p in zip(labels, row)}
                                  for row in probs]}

    return app


def check_address(host: str, port: int) -> None:
    """A one-line error for a port out of range, a host that does not resolve, or an address
    this machine cannot listen on (another server has it, a privileged port), instead of
    uvicorn's traceback or exit code 3 after the model has loaded."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not a host name or address ({e}); 127.0.0.1 "
                        f"serves this machine only, 0.0.0.0 every network") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                            f"another server may have it: choose another --port") from None


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("textune serve needs fastapi and uvicorn: pip install 'textune[serve]'") \
            from None
    from .classifier import load

    check_address(host, port)  # before the model loads: a taken port is said at once
    run = Path(run)
    clf = load(run)
    if clf.config.data.text_pair_col:
        raise UserError(f"{run}: this run classifies text pairs (column "
                        f"{clf.config.data.text_pair_col!r}); textune serve takes single texts. "
                        f"Use textune predict with a file holding both columns")
    app = create_app(clf, run, limits)
    log.info("serving %s on http://%s:%d  (docs: /docs)", run, host, port)
    # uvicorn stops accepting on SIGTERM / SIGINT and lets in-flight requests finish
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
