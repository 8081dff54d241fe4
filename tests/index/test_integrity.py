"""A damaged or half-written index is refused with one clear error, never a crash; `jaxmr index verify` finds
what `info` cannot see cheaply; writers clean what killed writers left (issue 25, items 6-8 and 10)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxmr.cli import main
from jaxmr.index.ann import InvalidIndexError
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.index.store import Searcher, current_version, verify_index

from conftest import SMOKE_SOURCE


@pytest.fixture(scope="module")
def pristine(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "index"
    build_index(smoke_run, SMOKE_SOURCE, out, split="test", options=BuildOptions(), progress=False)
    return out


@pytest.fixture
def index(pristine, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def refused(capsys, index: Path, *commands: str) -> list[str]:
    """Each command's single error line (exit 2, no traceback)."""
    lines = []
    for command in commands:
        argv = {"info": ["index", "info", str(index)], "verify": ["index", "verify", str(index)],
                "search": ["index", "search", str(index), "a red circle"],
                "serve": ["serve", "--index", str(index), "--port", "1"]}[command]  # fmt: skip
        code, err = cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (command, err)
        lines.append(err)
    return lines


def test_a_sound_index_verifies(index, capsys):
    manifest = verify_index(index)
    files = manifest["images"]["files"]
    assert {"embeddings.npy", "ids.npy", "meta.parquet"} <= set(files) and all(
        len(f["sha256"]) == 64 for f in files.values()
    )
    code, err = cli(capsys, "index", "verify", str(index))
    assert code == 0, err


def test_truncated_embeddings_are_refused_before_use(index, capsys):
    embeddings = current_version(index) / "images" / "embeddings.npy"
    with embeddings.open("r+b") as f:
        f.truncate(embeddings.stat().st_size // 2)
    with pytest.raises(InvalidIndexError, match=r"embeddings\.npy has"):
        Searcher(index, load_encoder=False)
    refused(capsys, index, "info", "verify", "search", "serve")


def test_empty_embeddings_file_is_refused(index, capsys):
    (current_version(index) / "images" / "embeddings.npy").write_bytes(b"")
    (err,) = refused(capsys, index, "search")
    assert "embeddings.npy" in err


def test_same_size_damage_is_found_by_verify_not_info(index, capsys):
    embeddings = current_version(index) / "images" / "embeddings.npy"
    data = bytearray(embeddings.read_bytes())
    data[-3] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    code, _ = cli(capsys, "index", "info", str(index))
    assert code == 0  # the cheap checks cannot see it
    (err,) = refused(capsys, index, "verify")
    assert "checksum" in err
    with pytest.raises(InvalidIndexError, match="checksum"):
        Searcher(index, load_encoder=False)  # a server refuses it too


@pytest.mark.parametrize(
    "damage",
    ["manifest_list", "manifest_garbage", "missing_meta", "wrong_count", "symlink_loop", "link_elsewhere"],
)
def test_broken_versions_get_one_error_line(index, capsys, damage):
    version = current_version(index)
    manifest_path = version / "manifest.json"
    if damage == "manifest_list":
        manifest_path.write_text("[1, 2]")
    elif damage == "manifest_garbage":
        manifest_path.write_text("{not json")
    elif damage == "missing_meta":
        (version / "images" / "meta.parquet").unlink()
    elif damage == "wrong_count":
        manifest = json.loads(manifest_path.read_text())
        manifest["images"]["count"] += 1
        manifest_path.write_text(json.dumps(manifest))
    else:
        (index / "current").unlink()
        os.symlink("current" if damage == "symlink_loop" else "/etc", index / "current")
    refused(capsys, index, "info", "verify", "search", "serve")


def test_files_where_directories_go_and_empty_sources(smoke_run, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, err = cli(capsys, "index", "build", "--workdir", str(smoke_run), "--source", SMOKE_SOURCE, "--out",
                    str(a_file), "--no-progress")  # fmt: skip
    assert code == 2 and "is a file" in err and a_file.read_text() == "x"
    code, err = cli(capsys, "train", "--config", str(Path(__file__).parents[2] / "configs" / "shapes_tiny.py:smoke"),
                    "--workdir", str(a_file), "--no-progress")  # fmt: skip
    assert code == 2 and "is a file" in err
    code, err = cli(capsys, "index", "build", "--workdir", str(smoke_run), "--source", "shapes:n=0,n_val=0,n_test=0",
                    "--out", str(tmp_path / "empty"), "--no-progress")  # fmt: skip
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    for k in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as exit_:
            main(["index", "search", str(tmp_path), "query", "-k", k])
        assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", "--index", str(tmp_path), "--port", "99999"])


def test_the_next_writer_removes_what_killed_writers_left(index):
    searcher = Searcher(index)
    kept = {p.name for p in (index / "files").iterdir()}
    half_written = index / ".v000009.k1ll3d"
    (half_written / "images").mkdir(parents=True)
    (half_written / "images" / "embeddings.npy").write_bytes(b"\0" * 1000)
    orphan = index / "files" / "000999999.png"
    orphan.write_bytes(b"an upload killed before its commit")
    os.symlink("v000001", index / ".current.4242")
    (new,) = searcher.add([np.zeros((32, 32, 3), np.uint8)])
    names = {p.name for p in index.iterdir()}
    assert not half_written.exists() and not orphan.exists() and ".current.4242" not in names
    assert {p.name for p in (index / "files").iterdir()} == kept | {f"{new:09d}.png"}  # referenced files stay
    verify_index(index)


def test_a_failed_add_leaves_no_files(index, monkeypatch):
    searcher = Searcher(index)
    before = sorted((index / "files").iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr("jaxmr.index.wal.WriteAheadLog.append", broken)
    with pytest.raises(RuntimeError, match="disk filled"):
        searcher.add([np.zeros((32, 32, 3), np.uint8)])
    assert sorted((index / "files").iterdir()) == before


def test_cleanup_deletes_nothing_when_it_cannot_tell_what_is_referenced(index):
    searcher = Searcher(index)
    searcher.add([np.zeros((32, 32, 3), np.uint8)])
    assert searcher.compact()["version"] == 2  # v000002; v000001 is kept for slow readers
    (index / "v000001" / "images" / "meta.parquet").write_bytes(b"damaged")
    orphan = index / "files" / "000999999.png"
    orphan.write_bytes(b"maybe an image a version we cannot read still needs")
    assert Searcher(index).clean() == [] and orphan.exists()
