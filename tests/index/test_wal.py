"""The index's write-ahead log: records survive a reopen exactly, a torn last append is dropped (never applied
half), damage that is not a torn tail is refused, every append is fsynced, and a kill -9 loses nothing
acknowledged."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxmr.index.wal import MAGIC, CorruptLogError, WriteAheadLog, encode

from conftest import ROOT


def _three(path):
    log = WriteAheadLog(path, base=7)
    rng = np.random.default_rng(0)
    entries = [
        log.append("add", {"rows": [{"id": 10, "path": "a.jpg"}]},
                   {"ids": np.array([10], np.int64), "vectors": rng.standard_normal((1, 256)).astype(np.float32)}),
        log.append("delete", {}, {"ids": np.array([3, 4], np.int64)}),
        log.append("add", {"rows": [{"id": 11}, {"id": 12}]},
                   {"ids": np.array([11, 12], np.int64), "vectors": rng.standard_normal((2, 256)).astype(np.float16)}),
    ]  # fmt: skip
    return log, entries


def _same(a, b):
    assert (a.seq, a.op, a.meta) == (b.seq, b.op, b.meta) and a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])


def test_records_survive_a_reopen_and_cost_what_they_carry(tmp_path):
    path = tmp_path / "wal"
    log, written = _three(path)
    assert [e.seq for e in written] == [0, 1, 2] and log.size == path.stat().st_size
    reopened = WriteAheadLog(path, base=7)
    for a, b in zip(reopened.entries(), written, strict=True):
        _same(a, b)
    assert reopened.append("delete", {}, {"ids": np.array([10])}).seq == 3  # numbering goes on
    one_vector = len(encode(written[0]))
    assert one_vector < 2048  # 1 KB of float32 + its header: a single add writes what it changes, not the index
    assert path.read_bytes().startswith(MAGIC)


def test_a_torn_last_append_is_dropped_never_applied_half(tmp_path):
    path = tmp_path / "wal"
    log, written = _three(path)
    whole = path.read_bytes()
    start = len(whole) - len(encode(written[2]))
    for cut in [start + 1, start + 7, start + 8, start + 40, len(whole) - 1]:  # inside the last record
        path.write_bytes(whole[:cut])
        torn = WriteAheadLog(path, base=7)
        assert [e.seq for e in torn.entries()] == [0, 1] and torn.torn_bytes == cut - start
        assert torn.append("delete", {}, {"ids": np.array([1])}).seq == 2  # lands where the torn one began
        after = WriteAheadLog(path, base=7).entries()
        assert [e.op for e in after] == ["add", "delete", "delete"] and after[2].arrays["ids"].tolist() == [1]
    damaged = bytearray(whole)
    damaged[-3] ^= 0xFF  # the last record whole in length but garbled (a crash before its data reached the disk)
    path.write_bytes(bytes(damaged))
    log = WriteAheadLog(path, base=7)
    assert len(log.entries()) == 2 and log.repair() == len(encode(written[2])) and log.torn_bytes == 0
    assert path.stat().st_size == start


def test_damage_that_is_not_a_torn_tail_is_refused(tmp_path):
    path = tmp_path / "wal"
    _, written = _three(path)
    whole = bytearray(path.read_bytes())
    middle = len(whole) - len(encode(written[2])) - 5
    whole[middle] ^= 0x01  # inside record 1, with record 2 after it: acknowledged writes follow
    path.write_bytes(bytes(whole))
    with pytest.raises(CorruptLogError, match="fails its checksum and more follow"):
        WriteAheadLog(path, base=7).entries()
    _three(tmp_path / "other")
    with pytest.raises(CorruptLogError, match="over version 7, not 8"):  # a log over another base version
        WriteAheadLog(tmp_path / "other", base=8)
    (tmp_path / "junk").write_bytes(b"not a log at all")
    with pytest.raises(CorruptLogError, match="not a jaxmr write-ahead log"):
        WriteAheadLog(tmp_path / "junk", base=0)


def test_every_append_is_fsynced_before_it_returns(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    log = WriteAheadLog(tmp_path / "wal", base=0)
    assert len(synced) == 2  # the new file and its folder (its name is durable too)
    for i in range(3):
        log.append("delete", {}, {"ids": np.array([i])})
        assert len(synced) == 3 + i


APPENDER = """
import sys
import numpy as np
from jaxmr.index.wal import WriteAheadLog
log = WriteAheadLog(sys.argv[1], base=1)
rng = np.random.default_rng(0)
while True:
    entry = log.append("add", {"n": 64}, {"vectors": rng.standard_normal((64, 256)).astype(np.float32)})
    print(entry.seq, flush=True)  # acknowledged only once append returned
"""


def test_kill_9_during_appends_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "wal"
    process = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    acknowledged = []
    deadline = time.time() + 60
    while len(acknowledged) < 40 and time.time() < deadline:
        acknowledged.append(int(process.stdout.readline()))
    process.send_signal(signal.SIGKILL)
    process.wait()
    acknowledged += [int(line) for line in process.stdout.read().split()]
    entries = WriteAheadLog(path, base=1).entries()
    assert [e.seq for e in entries] == list(range(len(entries)))  # a prefix, in order, nothing half-applied
    assert len(entries) >= len(acknowledged) >= 40
    assert all(e.arrays["vectors"].shape == (64, 256) for e in entries)
