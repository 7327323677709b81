"""`textune serve`: answers, micro-batches concurrent requests, refuses bad input with 4xx and
keeps answering."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from textune.serve import Limits, create_app  # noqa: E402


class FakeClassifier:
    """Counts forward passes; 'pos' in a text makes it positive."""
    names = ["neg", "pos"]

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def predict_proba(self, texts):
        with self.lock:
            self.calls.append(len(texts))
        p = np.array([[0.1, 0.9] if "pos" in t else [0.8, 0.2] for t in texts])
        return p

    def decide(self, probs):
        return [self.names[i] for i in probs.argmax(1)]


@pytest.fixture
def client(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.89}))
    clf = FakeClassifier()
    app = create_app(clf, tmp_path, Limits(max_texts=4, max_chars=50, max_body=5000))
    with TestClient(app) as c:
        c.clf = clf
        yield c


def test_predict_health_info(client):
    r = client.post("/predict", json={"texts": ["so pos", "bad"]})
    assert r.status_code == 200
    body = r.json()
    assert body["labels"] == ["pos", "neg"]
    assert body["probabilities"][0] == {"neg": 0.1, "pos": 0.9}
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["labels"] == ["neg", "pos"] and info["metrics"]["accuracy"] == 0.9
    assert "/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b"\xff\xfe\x00garbage", 400),
    (b'{"texts": "one string"}', 422),
    (b'{"texts": [1, 2]}', 422),
    (b'{"text": ["x"]}', 422),
    (b'[1, 2, 3]', 422),
    (b'{"texts": []}', 422),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 413),
    (json.dumps({"texts": ["x" * 51]}).encode(), 422),
    (json.dumps({"texts": ["x" * 40] * 3 + ["y" * 6000]}).encode(), 413),
    (b"[" * 1500 + b"]" * 1500, 400),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_answering(client, body, status):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert "error" in r.json() and r.json()["error"]
    assert client.post("/predict", json={"texts": ["pos"]}).status_code == 200
    assert not client.clf.calls or all(n <= 4 for n in client.clf.calls)


def test_concurrent_requests_share_forward_passes(tmp_path):
    import httpx

    clf = FakeClassifier()
    app = create_app(clf, tmp_path, Limits(max_batch=64, batch_wait_ms=50))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                rs = await asyncio.gather(*[c.post("/predict", json={"texts": [f"pos {i}"]})
                                            for i in range(20)])
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 and r.json()["labels"] == ["pos"] for r in rs)
    assert sum(clf.calls) == 20 and len(clf.calls) < 20  # batched together


def test_shutdown_finishes_in_flight_requests(tmp_path):
    # what SIGTERM/SIGINT do in uvicorn (should_exit) while a slow forward pass is running:
    # the request still gets its answer, then the server stops
    import socket
    import time
    import urllib.request

    import uvicorn

    class Slow(FakeClassifier):
        def predict_proba(self, texts):
            time.sleep(1.5)
            return super().predict_proba(texts)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Slow(), tmp_path, Limits())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    answer = {}

    def ask():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict",
                                     data=json.dumps({"texts": ["pos text"]}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as r:
            answer["status"], answer["body"] = r.status, json.loads(r.read())

    client = threading.Thread(target=ask)
    client.start()
    time.sleep(0.5)  # the request is inside the forward pass now
    server.should_exit = True
    client.join(20)
    thread.join(20)
    assert answer.get("status") == 200 and answer["body"]["labels"] == ["pos"]
    assert not thread.is_alive()


def test_serve_refuses_a_bad_or_taken_address_in_one_line_before_loading(tmp_path, capsys):
    """A port out of range, a host that does not resolve, a port another server listens on:
    one line naming the flag, exit 2, before the run is read (the folder here is not a run)."""
    import socket

    from textune.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, said in ((["--port", "99999"], "--port 99999"),
                            (["--host", "bad..host"], "--host bad..host"),
                            (["--port", str(port)], f"--port {port}: cannot listen")):
            capsys.readouterr()
            assert main(["serve", str(tmp_path), *flags]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and said in err, err
