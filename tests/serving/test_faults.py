"""Fault injection: `kill -9` the server during concurrent uploads and deletes, restart it, and check that the
index verifies, every acknowledged write is there, and nothing half-written is left (issue 25)."""

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxmr.cli import main
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.index.store import Searcher, _compaction_running, current_version, referenced_files

from conftest import ROOT, SMOKE_SOURCE

KEY = "fault-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index: Path, port: int, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxmr.cli", "serve", "--index", str(index), "--port", str(port), "--api-key", KEY]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": "", "JAXMR_WARM_UP": "0", **env})  # fmt: skip


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("during", ["writes", "compaction"])
def test_kill_9_during_concurrent_uploads_and_deletes(smoke_run, tmp_path, capsys, during, kill_after=6):
    """kill -9 while uploads and deletes are in flight (and, the second time, while the server compacts in the
    background: due after every write here): every acknowledged write is there after a restart, none comes
    back half-applied, the index verifies, and nothing temporary is left."""
    import httpx

    index = tmp_path / "index"
    build_index(smoke_run, SMOKE_SOURCE, index, split="test", options=BuildOptions(), progress=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    compacting = {"JAXMR_COMPACT_SHARE": "0.001", "JAXMR_COMPACT_MIN": "1"} if during == "compaction" else {}
    server = start(index, port, **compacting)
    wait_ready(url, server)

    added, deleted, lock, stop = [], [], threading.Lock(), threading.Event()
    originals = list(range(64))

    def uploader(worker: int) -> None:
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = client.post("/api/images", files=[("files", (f"{worker}-{n}.png", png(worker * 1000 + n),
                                                                     "image/png"))])  # fmt: skip
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        added.extend(r.json()["ids"])

    def deleter() -> None:
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=30) as client:
            while not stop.is_set() and originals:
                victim = originals.pop()
                try:
                    r = client.delete(f"/api/images/{victim}")
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    with lock:
                        deleted.append(victim)

    threads = [threading.Thread(target=uploader, args=(w,)) for w in range(3)] + [threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        compacting_at_kill = _compaction_running(index)
        if len(added) + len(deleted) >= kill_after and (during == "writes" or compacting_at_kill):
            break
        time.sleep(0.001)
    server.send_signal(signal.SIGKILL)  # requests are in flight: some were acknowledged, some not
    server.wait()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert len(added) + len(deleted) >= kill_after

    restarted = start(index, port)  # opening the index for writing removes what the killed server left
    try:
        wait_ready(url, restarted)
        capsys.readouterr()
        assert main(["index", "verify", str(index)]) == 0, capsys.readouterr().err
        searcher = Searcher(index, load_encoder=False)
        records = searcher.records(added + deleted)
        assert all(r is not None for r in records[: len(added)]), "an acknowledged upload is missing"
        assert all(r is None for r in records[len(added) :]), "an acknowledged delete came back"
        leftovers = [p.name for p in index.iterdir() if re.fullmatch(r"\.v\d{6}\..+|\.current\.\d+", p.name)]
        assert compacting_at_kill or during == "writes"
        assert not leftovers, leftovers
        referenced = referenced_files(index)  # every version's live rows: its base and its log
        orphans = [f.name for f in (index / "files").iterdir() if f"files/{f.name}" not in referenced]
        assert not orphans, orphans
        assert current_version(index) is not None
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)
    shutil.rmtree(index, ignore_errors=True)
