"""`jaxmr demo`: train -> evaluate -> index -> serve, reusing what exists; --photos indexes a folder."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from jaxmr.cli import main as cli
from jaxmr.index.store import Searcher

from conftest import ROOT, write_image

SMOKE = str(ROOT / "configs" / "shapes_tiny.py") + ":smoke"


def test_demo_builds_everything_then_reuses_it(tmp_path, capsys, monkeypatch):
    args = ["demo", "--workdir", str(tmp_path), "--config", SMOKE, "--no-serve", "--no-progress"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "text->image" in out and "64 images, 320 captions" in out and (tmp_path / "shapes_preview.png").exists()
    searcher = Searcher(tmp_path / "index")
    assert searcher.manifest["images"]["count"] == 256 + 64 + 64  # every split of the smoke world
    assert searcher.manifest["captions"]["count"] == 5 * 384
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "reusing the finished run" in out and "reusing the index" in out

    photos = tmp_path / "my photos"
    for i in range(5):
        write_image(photos / f"p{i}.jpg", 40 * i)
    (photos / "notes.txt").write_text("not an image")
    monkeypatch.setattr("jaxmr.demo.PHOTO_RUN", tmp_path / "no-photo-model-here")  # not a user's runs/flickr8k_lit
    assert cli([*args, "--photos", str(photos)]) == 0
    out = capsys.readouterr().out
    assert "indexed 5 images" in out and "with the demo model" in out
    (index,) = tmp_path.glob("photos-*")
    assert Searcher(index).manifest["captions"] is None
    # --photo-model picks the model (any run or export); naming the demo's own run reuses the index it built
    assert cli([*args, "--photos", str(photos), "--photo-model", str(tmp_path / "shapes_tiny")]) == 0
    out = capsys.readouterr().out
    assert f"with the photo model {tmp_path / 'shapes_tiny'}" in out and f"reusing the index in {index}" in out


def test_demo_serves_until_ctrl_c(tmp_path, smoke_run):
    shutil.copytree(smoke_run, tmp_path / "shapes_tiny")  # the same smoke config, trained once per session
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    argv = [sys.executable, "-m", "jaxmr.cli", "demo", "--workdir", str(tmp_path), "--config", SMOKE, "--port",
            str(port), "--no-progress"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.25)
        results = httpx.post(url + "/api/search", json={"text": "a large red circle", "k": 3}).json()["results"]
        assert len(results) == 3 and httpx.get(url + results[0]["thumbnail"]).status_code == 200
        assert httpx.get(url + "/").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"open http://127.0.0.1:{port}" in output and "a small white diamond" in output
    assert "reusing the finished run" in output  # training itself is the first test's (and smoke_run's) part
    assert "Traceback" not in output
    assert json.loads((tmp_path / "shapes_tiny" / "config.json").read_text())["steps"] == 6
