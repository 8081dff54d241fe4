"""Index writes that cost what they change: each add and delete is one fsynced log record over an immutable base,
replayed on open; other processes catch up; compaction folds the log into a new base while searches and writes
go on; kill -9 during writes or a compaction loses nothing acknowledged and leaves nothing half-applied."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxmr.cli import main
from jaxmr.index.ann import AnnConfig, InvalidIndexError, exact_search
from jaxmr.index.build import write_index
from jaxmr.index.live import LiveCollection
from jaxmr.index.store import Searcher, _compaction_running, current_version, index_info, log_path, verify_index

from conftest import ROOT

DIM = 32  # the smoke model's embedding width


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fp16(x: np.ndarray) -> np.ndarray:  # what the index stores
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture
def index(smoke_run, tmp_path):
    out = tmp_path / "index"
    write_index(out, smoke_run, unit(3000, 0), ann=AnnConfig(method="ah"))
    return out


def version_bytes(path):
    return sum(p.stat().st_size for p in current_version(path).rglob("*") if p.is_file())


def test_writes_cost_what_they_change_and_a_reopen_replays_them(index):
    searcher = Searcher(index, load_encoder=False)
    before = version_bytes(index)
    added = unit(5, 1)
    ids = searcher.add_vectors(added[:1], [{"captions": ["a caption kept as metadata"]}])
    assert ids == [3000] and searcher.generation == (1, 1) and version_bytes(index) == before  # no new version
    one_add = log_path(current_version(index)).stat().st_size
    assert one_add < 1024  # header + one 32-d float16 vector with its row, not a copy of the index
    assert searcher.add_vectors(added[1:]) == [3001, 3002, 3003, 3004]
    assert searcher.delete([7, 3002, 99_999]) == 2 and searcher.delete([7]) == 0  # deleted ids are gone
    assert sorted(p.name for p in index.iterdir() if p.name.startswith("v")) == ["v000001", "v000001.log"]

    # searchable at once: each added vector finds itself, deleted ones never come back
    found, scores = searcher.search(added, 3)
    assert found[[0, 1, 3, 4], 0].tolist() == [3000, 3001, 3003, 3004] and 3002 not in found
    np.testing.assert_allclose(scores[[0, 1, 3, 4], 0], 1.0, atol=2e-3)  # float16 storage
    assert searcher.records([3000, 3002, 7]) == [
        {"id": 3000, "path": None, "width": 0, "height": 0, "captions": ["a caption kept as metadata"]}, None, None
    ]  # fmt: skip
    counts = {"base": 3000, "delta": 5, "tombstones": 2, "count": 3003}
    assert searcher.counts()["images"] == counts and len(searcher.collection()) == 3003

    # a reopen replays the log: the same answers; exact search equals numpy over the live vectors
    queries = unit(20, 2)
    reopened = Searcher(index, load_encoder=False)
    assert reopened.generation == (1, 3) and reopened.counts()["images"] == counts
    np.testing.assert_array_equal(reopened.search(queries, 10)[0], searcher.search(queries, 10)[0])
    live_ids = np.setdiff1d(np.arange(3005), [7, 3002])
    vectors = fp16(np.concatenate([unit(3000, 0), added]))[live_ids]
    truth = live_ids[exact_search(vectors, queries, 10)[0]]
    np.testing.assert_array_equal(reopened.search(queries, 10, exact=True)[0], truth)
    with pytest.raises(ValueError, match="vectors must be finite"):
        searcher.add_vectors(np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match="unknown row fields"):
        searcher.add_vectors(added[:1], [{"file": "x.jpg"}])

    info = index_info(index)
    assert info["live"]["images"] == counts and info["live"]["log_writes"] == 3 and info["version"] == 1
    assert info["live"]["log_bytes"] == log_path(current_version(index)).stat().st_size
    assert verify_index(index)["live"]["images"]["count"] == 3003


def test_a_torn_last_record_is_dropped_and_damage_before_the_end_is_refused(index, capsys):
    searcher = Searcher(index, load_encoder=False)
    searcher.add_vectors(unit(2, 1))
    log = log_path(current_version(index))
    whole = log.read_bytes()
    log.write_bytes(whole + whole[-40:-3])  # a record's start, cut short: an append a crash interrupted
    torn = Searcher(index, load_encoder=False)
    assert torn.counts()["images"]["delta"] == 2 and index_info(index)["live"]["torn_bytes"] == 37
    assert torn.add_vectors(unit(1, 3)) == [3002]  # the next write truncates the torn tail first
    assert Searcher(index, load_encoder=False).counts()["images"]["delta"] == 3
    assert index_info(index)["live"]["torn_bytes"] == 0

    damaged = bytearray(log.read_bytes())
    damaged[len(whole) - 20] ^= 0xFF  # inside the first record, with another after it: acknowledged writes follow
    log.write_bytes(bytes(damaged))
    with pytest.raises(InvalidIndexError, match="fails its checksum and more follow"):
        Searcher(index, load_encoder=False)
    assert main(["index", "verify", str(index)]) == 2
    assert "fails its checksum and more follow" in capsys.readouterr().err


WRITER = """
import sys
import numpy as np
from jaxmr.index.store import Searcher
searcher = Searcher(sys.argv[1], load_encoder=False)
rng = np.random.default_rng(int(sys.argv[2]))
for n in range(int(sys.argv[3])):
    x = rng.normal(size=(1, 32)).astype(np.float32)
    (i,) = searcher.add_vectors(x / np.linalg.norm(x))
    if n % 3 == 2:
        assert searcher.delete([i]) == 1
        print("deleted", i, flush=True)
    else:
        print("added", i, flush=True)
"""


def test_processes_write_at_once_and_each_catches_up(index):
    """Two writer processes and this one (which also compacts meanwhile) write at once: every acknowledged write
    is there afterwards, no id is handed out twice, and a reader in another process follows by refreshing."""
    reader = Searcher(index, load_encoder=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(index), str(seed), "40"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True) for seed in (1, 2)]  # fmt: skip
    mine = Searcher(index, load_encoder=False)
    added, deleted = [], []
    for n in range(30):
        added += mine.add_vectors(unit(1, 100 + n))
        if n == 15:
            mine.compact()  # a new base while the others write: they catch up with it before their next write
    lines = []
    for w in writers:
        out, _ = w.communicate(timeout=120)
        assert w.returncode == 0
        lines += out.split("\n")
    added += [int(line.split()[1]) for line in lines if line.startswith("added")]
    deleted += [int(line.split()[1]) for line in lines if line.startswith("deleted")]
    assert len(added) == 30 + 2 * 27 and len(deleted) == 2 * 13
    assert len(set(added) | set(deleted)) == len(added) + len(deleted)  # no id handed out twice

    assert reader.refresh() and reader.version == 2
    for searcher in (reader, Searcher(index, load_encoder=False)):
        assert all(r is not None for r in searcher.records(added)) and searcher.records(deleted) == [None] * 26
        assert len(searcher.collection()) == 3000 + len(added)
    verify_index(index)


def test_compaction_folds_the_log_while_searches_and_writes_go_on(smoke_run, tmp_path, monkeypatch, capsys):
    index = tmp_path / "index"
    base = unit(6000, 0)
    write_index(index, smoke_run, base, ann=AnnConfig(method="tree_ah", num_leaves=20, leaves_to_search=20))
    searcher, other = Searcher(index, load_encoder=False), Searcher(index, load_encoder=False)
    added = unit(500, 1)
    searcher.add_vectors(added)
    searcher.delete(np.arange(0, 6000, 60))  # 100 tombstones
    manifest = json.loads((current_version(index) / "manifest.json").read_text())

    # A search runs throughout: every answer must hold an added vector's own id and never a deleted one.
    probes = added[:8]
    errors, answers, stop = [], [], threading.Event()

    def search_throughout():
        while not stop.is_set():
            try:
                found = searcher.search(probes, 5)[0]
                assert found[:, 0].tolist() == list(range(6000, 6008)) and not np.isin(found, [0, 60, 120]).any()
                answers.append(found)
            except Exception as e:
                errors.append(e)

    real = LiveCollection.compacted

    def compacted_with_writes_meanwhile(self):
        fresh = real(self)
        if len(self) > 6000:  # the images: another writer adds and deletes while the new base is built
            other.add_vectors(unit(3, 2))
            other.delete([6100, 1])
        return fresh

    monkeypatch.setattr(LiveCollection, "compacted", compacted_with_writes_meanwhile)
    thread = threading.Thread(target=search_throughout)
    thread.start()
    time.sleep(0.2)
    done = searcher.compact()
    time.sleep(0.2)
    stop.set()
    thread.join()
    assert not errors, errors[:3]
    assert len(answers) > 10

    assert done["version"] == 2 and done["folded_writes"] == 2 and done["carried_writes"] == 2
    assert done["images"] == {"base": 6000, "delta": 500, "tombstones": 100, "count": 6400}
    assert searcher.version == 2 and sorted(p.name for p in index.iterdir() if p.name.startswith("v")) == [
        "v000001", "v000001.log", "v000002", "v000002.log"]  # the old base stays for slow readers  # fmt: skip
    new = json.loads((current_version(index) / "manifest.json").read_text())
    assert new["images"]["count"] == 6400 and new["images"]["ann"] == manifest["images"]["ann"]  # same settings
    assert new["seq"] == 2 and new["compacted"]["from_version"] == 1
    # the writes made during the build are in the new base's log, and everyone sees the same live set
    assert searcher.counts()["images"] == {"base": 6400, "delta": 3, "tombstones": 2, "count": 6401}
    assert searcher.generation == (2, 4) and other.refresh() and other.generation == (2, 4)
    assert searcher.records([6100, 1]) == [None, None]
    assert None not in searcher.records([6500, 6502])
    queries = unit(30, 3)
    live_ids = np.setdiff1d(np.arange(6503), np.concatenate([np.arange(0, 6000, 60), [6100, 1]]))
    vectors = fp16(np.concatenate([base, added, unit(3, 2)]))[live_ids]
    truth = live_ids[exact_search(vectors, queries, 10)[0]]
    for s in (searcher, other, Searcher(index, load_encoder=False)):
        np.testing.assert_array_equal(s.search(queries, 10, exact=True)[0], truth)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(s.search(queries, 10)[0], truth, strict=True)]) > 0.95

    # on demand from the command line; then there is nothing left to fold
    monkeypatch.setattr(LiveCollection, "compacted", real)
    assert main(["index", "compact", str(index)]) == 0
    assert "version 2 + 2 logged writes -> version 3: 6401 images" in capsys.readouterr().out
    assert main(["index", "compact", str(index)]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert verify_index(index)["live"]["log_writes"] == 0 and len(list(index.glob("v00000?"))) == 3  # three kept


COMPACTOR = """
import sys
from jaxmr.index.store import Searcher
print("compacting", flush=True)
Searcher(sys.argv[1], load_encoder=False).compact()
print("done", flush=True)
"""


def test_kill_9_during_a_compaction_leaves_the_old_base_and_its_log(smoke_run, tmp_path):
    """A compaction killed while it builds, and once while it writes the new version, leaves the index as it was
    (the old base and its whole log); the next writer removes what it left, and the next compaction completes."""
    index = tmp_path / "index"
    write_index(index, smoke_run, unit(20_000, 0), ann=AnnConfig(method="tree_ah"))
    searcher = Searcher(index, load_encoder=False)
    added = searcher.add_vectors(unit(2000, 1))
    searcher.delete(added[::10])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for wait_for in ("build", "stage"):
        process = subprocess.Popen([sys.executable, "-c", COMPACTOR, str(index)], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert process.stdout.readline().strip() == "compacting"
        deadline = time.time() + 60
        while time.time() < deadline:
            staged = [p for p in index.iterdir() if p.name.startswith(".v000002.")]
            if (wait_for == "build" and _compaction_running(index)) or (wait_for == "stage" and staged):
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.stdout.read() == ""  # killed before it swapped
        assert current_version(index).name == "v000001"
        reopened = Searcher(index, load_encoder=False)
        assert reopened.counts()["images"] == {"base": 20_000, "delta": 2000, "tombstones": 200, "count": 21_800}
        verify_index(index)
    reopened.add_vectors(unit(1, 2))  # the first write cleans up
    assert not [p.name for p in index.iterdir() if p.name.startswith((".v", "v000002"))]
    assert reopened.compact()["version"] == 2 and reopened.counts()["images"]["count"] == 21_801
    verify_index(index)


def test_a_compaction_writes_the_searcher_from_a_child_process_or_here_when_that_fails(tmp_path, monkeypatch):
    """ScaNN's serializer holds the GIL for seconds at scale, so a compaction has a forked child write the
    searcher; a child that outlasts its time is killed and this process writes it. Either way it loads and
    answers as the original."""
    import pyarrow as pa

    import jaxmr.index.collection as collection_module
    from jaxmr.index.collection import Collection

    ids = np.arange(3000, dtype=np.int64)
    original = Collection.create(ids, unit(3000, 0), pa.table({"id": ids}), AnnConfig(method="ah"))
    queries = unit(10, 1)
    for timeout in (600.0, 0.0):
        monkeypatch.setattr(collection_module, "SERIALIZE_TIMEOUT", timeout)
        original.save(tmp_path / str(timeout), serve_meanwhile=True)
        loaded = Collection.load(tmp_path / str(timeout), original.ann)
        np.testing.assert_array_equal(loaded.search(queries, 10)[0], original.search(queries, 10)[0])
