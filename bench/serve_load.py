"""Latency and throughput of `POST /api/search` under 1, 8 and 32 concurrent clients on loopback.

    python -m bench.serve_load --workdir runs/demo/shapes_tiny --size 1000000 [--seconds 20] [--quick]
    python -m bench.serve_load --workdir RUN_A --workdir RUN_B --size 100000   # text towers side by side

The index holds `--size` synthetic vectors (`bench.common.clustered_vectors`, ScaNN auto-configured and
calibrated); the text encoder is the run's real one, so every request tokenizes, encodes and searches. The
server runs as `jaxmr serve` in its own process; the clients are asyncio + httpx in this one. With several
`--workdir`s each run's server answers in turn over the same vectors (rows named by the run's text tower).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import clustered_vectors, write_results

QUERIES = ["a large red circle", "two small blue squares", "a green star left of a yellow triangle",
           "a purple diamond above a white circle", "three shapes", "a small orange star"]  # fmt: skip


async def load(url: str, clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = n
        while time.perf_counter() < stop:
            start = time.perf_counter()
            response = await http.post("/api/search", json={"text": QUERIES[i % len(QUERIES)], "k": 10})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200
            i += clients

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        for _ in range(3):  # warm the connections
            await http.post("/api/search", json={"text": "warm up", "k": 10})
        start = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {"clients": clients, "requests": len(ms), "errors": errors, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests_per_s": len(ms) / elapsed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        action="append",
        help="a training run (its text encoder answers the queries); repeat it to compare runs in one measurement",
    )
    parser.add_argument("--size", type=float, default=1e6)
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quick", action="store_true", help="a small index and 1 s per level (CI smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from jaxmr.index.build import write_index

    with tempfile.TemporaryDirectory() as tmp:
        workdirs = args.workdir or [_smoke_run(Path(tmp) / "run")]
        n = 5_000 if args.quick else int(args.size)
        seconds = 1.0 if args.quick else args.seconds
        dims = {_embed_dim(w) for w in workdirs}
        if len(dims) > 1:
            raise SystemExit(f"the runs embed in different sizes ({sorted(dims)}): one index cannot serve them all")
        dim = dims.pop()
        vectors, text, _ = clustered_vectors(n, dim, 500)
        records = []
        for number, workdir in enumerate(workdirs):
            index = Path(tmp) / f"index{number}"
            start = time.perf_counter()
            write_index(index, workdir, vectors, queries=text, description=f"synthetic clustered {n}")
            build_s = time.perf_counter() - start
            for record in _serve(index, args.port, [int(c) for c in args.clients.split(",")], seconds, args.quick):
                record = {"text_tower": _text_tower(workdir), "index_size": n, "dim": dim, **record}
                records.append(record)
                print(record, flush=True)
        del vectors
    notes = (
        f"`POST /api/search` with a text query and k=10 against {n:,} synthetic {dim}-d vectors (ScaNN "
        f"auto-configured, built in {build_s:.0f} s) with the run's real text encoder; clients and server share "
        "the machine's cores, so the figures include the clients' own cost. Micro-batching groups concurrent "
        "queries into one encoder call and one search."
    )
    columns = ["text_tower", "index_size", "dim", "clients", "requests", "errors", "p50_ms", "p99_ms", "requests_per_s"]
    path = write_results("serve_load", records, columns, "Search server under load", notes, args.out)
    print(f"wrote {path}")


def _serve(index: Path, port: int, levels: list[int], seconds: float, quick: bool) -> list[dict]:
    """`jaxmr serve` on `index` in its own process, loaded by each number of clients in turn."""
    env = dict(os.environ, JAXMR_INDEX=str(index), JAXMR_PORT=str(port))
    if quick:  # a smoke test: no figures are kept, so no compiling of every bucket first
        env["JAXMR_WARM_UP"] = "0"
    server = subprocess.Popen([sys.executable, "-m", "jaxmr.cli", "serve"], env=env, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server)
        return [asyncio.run(load(url, clients, seconds)) for clients in levels]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _config(workdir: str) -> dict:
    import json

    return json.loads((Path(workdir) / "config.json").read_text())


def _embed_dim(workdir: str) -> int:
    return _config(workdir)["model"]["embed_dim"]


def _text_tower(workdir: str) -> str:
    """The run's text tower in a word: MPNet, BERT (MiniLM) or the Transformer with its width and depth."""
    text = _config(workdir)["model"]["text"]
    names = {"MPNetConfig": "MPNet", "BertConfig": "MiniLM (BERT)"}
    return names.get(text["__type__"], f"Transformer {text.get('width')}x{text.get('depth')}")


def _smoke_run(workdir: Path) -> str:
    from jaxmr.config import load_config_file
    from jaxmr.training.loop import train

    config = load_config_file(str(Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py:smoke"))
    train(config, workdir, progress=False)
    return str(workdir)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit("the server did not become ready")


if __name__ == "__main__":
    main()
