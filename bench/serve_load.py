"""Load test of `textune serve` on loopback: a bounded number of concurrent clients for a
bounded time, with and without micro-batching, then a bad-input barrage.

    python bench/serve_load.py --run RUN [--clients 16] [--seconds 20]

Without --run, a minilm-l6 run is trained first (frozen, rt-polarity, 1 epoch: ~1 minute).
Each client sends one rt-polarity sentence per request, back to back. Prints throughput,
p50/p99 latency, the status codes of the barrage, and whether the server still answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, *extra: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "textune.cli", "serve", run, "--port",
                             str(port), "--quiet", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("server did not start in 120 s")


async def load(port: int, texts: list[str], clients: int, seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await c.post("/predict", json={"texts": [texts[i % len(texts)]]})
            lat.append(time.perf_counter() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            i += clients

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                 limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, c) for k in range(clients)])
        wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"requests": len(lat), "req_per_s": len(lat) / wall, "p50_ms": float(np.median(a)),
            "p99_ms": float(np.percentile(a, 99)), "codes": codes}


def barrage(port: int) -> list[tuple[str, int]]:
    import httpx

    url = f"http://127.0.0.1:{port}/predict"
    h = {"content-type": "application/json"}
    cases = [
        ("malformed JSON", b'{"texts": ["a",', h),
        ("not JSON at all", b"hello", h),
        ("non-UTF-8 bytes", b"\xff\xfe\xfa\x00\x81", h),
        ("huge body (8 MiB)", b'{"texts": ["' + b"a" * (8 * 2**20) + b'"]}', h),
        ("texts is a string", b'{"texts": "abc"}', h),
        ("texts has numbers", b'{"texts": [1, 2, 3]}', h),
        ("texts has null", b'{"texts": [null]}', h),
        ("wrong key", b'{"text": ["abc"]}', h),
        ("a list, not an object", b'["abc"]', h),
        ("empty list", b'{"texts": []}', h),
        ("too many texts (10k)", json.dumps({"texts": ["x"] * 10_000}).encode(), h),
        ("one text of 1M chars", json.dumps({"texts": ["x" * 1_000_000]}).encode(), h),
        ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, h),
        ("empty body", b"", h),
        ("wrong content type", b"texts=abc", {"content-type": "text/plain"}),
    ]
    out = []
    with httpx.Client(timeout=60) as c:
        for name, body, headers in cases:
            try:
                r = c.post(url, content=body, headers=headers)
                out.append((name, r.status_code))
            except httpx.HTTPError as e:
                out.append((name, f"connection error: {type(e).__name__}"))
        r = c.get(url)
        out.append(("GET /predict", r.status_code))
        # a lying Content-Length header, sent on a raw socket (HTTP clients refuse to)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sk:
            sk.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                       b"\r\nContent-Length: 99999999999\r\n\r\n{\"texts\": [\"a\"]}")
            reply = sk.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        out.append(("lying content-length", int(reply.split()[1]) if reply.startswith("HTTP")
                    else f"closed: {reply!r}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()
    from textune.data import read_table, resolve_data

    texts = read_table(resolve_data("rt-polarity")).texts[:2000]
    run = a.run
    if run is None:
        run = str(Path(tempfile.mkdtemp(prefix="textune-serve-")) / "run")
        subprocess.run([sys.executable, "-m", "textune.cli", "train", "--model", "minilm-l6",
                        "--data", "rt-polarity", "--strategy", "frozen", "--epochs", "1",
                        "--max-length", "64", "--out", run, "--quiet"], check=True)
    print(f"run {run}; {a.clients} clients x {a.seconds:.0f} s, one sentence per request; "
          f"{os.cpu_count()} cores")
    print(f"{'mode':<16} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  codes")
    for mode, extra in (("micro-batching", ()), ("one per request", ("--no-microbatch",))):
        port = free_port()
        proc = start_server(run, port, *extra)
        try:
            r = asyncio.run(load(port, texts, a.clients, a.seconds))
            print(f"{mode:<16} {r['requests']:>9} {r['req_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f}  {r['codes']}")
            if mode == "micro-batching":
                results = barrage(port)
                import httpx

                h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                ok = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=30,
                                json={"texts": ["a gorgeous film"]})
                alive = h.status_code == 200 and ok.status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("\nbad-input barrage (micro-batching server):")
    five = 0
    for name, code in results:
        print(f"  {name:<26} {code}")
        five += isinstance(code, int) and code >= 500
    print(f"server errors (5xx): {five}; server still answered /health and /predict after "
          f"the barrage: {alive}")

if __name__ == "__main__":
    main()
