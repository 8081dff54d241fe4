"""The stream's planner at LAION's size, simulated: 40,000 virtual shards read by 32 processes (each planner built
with its own process_index in this one process), resampled shards, and the sizes a sample id must hold."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from bench.webscale_planner import VirtualUnits
from jaxmr.data.records import DataError
from jaxmr.data.stream import StreamConfig, StreamPlan, sample_id

SHARDS, PROCESSES, LOCAL = 40_000, 32, 16


def _startup(units, config, process):
    """(planner, peak bytes, seconds) of a planner's start and its first local batch."""
    tracemalloc.start()
    start = time.perf_counter()
    plan = StreamPlan(units, config, process, PROCESSES)
    first = [plan.draw() for _ in range(LOCAL)]
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return plan, first, peak, seconds


def test_40k_shards_over_32_processes_read_every_sample_once_with_unique_ids_in_bounded_memory():
    counts = np.random.default_rng(0).integers(1, 12, SHARDS)  # uneven shards (a broken tail, small last shards)
    units = VirtualUnits(counts)
    config = StreamConfig(batch_size=LOCAL * PROCESSES, seed=3, buffer=64, num_epochs=1)
    seen = np.zeros(SHARDS, np.int64)  # samples read per unit, over all processes
    owner = np.full(SHARDS, -1)
    streams = []
    for p in range(PROCESSES):
        plan, first, peak, seconds = _startup(units, config, p)
        # O(shards / processes) + the buffer, never O(samples): the epoch's permutation (8 bytes a shard, drawn
        # in full by every process, since each takes every P-th), this process's share as ints (~36 bytes
        # each), the buffered references (~300 bytes each) and a constant
        bound = 8 * SHARDS + 40 * SHARDS // PROCESSES + 300 * config.buffer + 64 * 1024
        assert peak <= bound, (p, peak, bound)
        assert seconds < 1.0 + 25e-6 * SHARDS, seconds  # ~20 ms here; a loaded 2-core CI machine has room
        ids = [ref for ref, _ in first]
        for drawn in iter(plan.draw, None):
            ids.append(drawn[0])
        units_read = {unit for unit, *_ in ids}
        assert (owner[list(units_read)] == -1).all()  # disjoint shards
        owner[list(units_read)] = p
        for unit, position, ordinal, _, _ in ids:
            assert position == ordinal  # virtual units: every sample usable, position = ordinal
            seen[unit] += 1
        streams.append(np.array([sample_id(unit, ordinal) for unit, _, ordinal, _, _ in ids], np.int64))
    np.testing.assert_array_equal(seen, counts)  # every sample exactly once, over the 32 processes
    assert (owner >= 0).all()
    # global batch b = every process's local batch b: the sample ids are unique in each
    batches = min(len(s) for s in streams) // LOCAL
    for b in range(batches):
        ids = np.concatenate([s[b * LOCAL : (b + 1) * LOCAL] for s in streams])
        assert len(np.unique(ids)) == len(ids) == LOCAL * PROCESSES


def test_resampled_shards_are_drawn_per_process_with_replacement_and_resume_exactly():
    units = VirtualUnits(np.full(1000, 5))
    config = StreamConfig(batch_size=8, seed=1, buffer=10, resampled=True)
    plans = [StreamPlan(units, config, p, 4) for p in range(4)]
    orders = [plan.order(0) for plan in plans]
    assert all(len(o) == 250 for o in orders)  # an epoch: ceil(1000 / 4) draws per process
    assert len({tuple(o) for o in orders}) == 4  # each process draws its own
    drawn = np.concatenate(orders)
    assert len(np.unique(drawn)) < len(drawn)  # with replacement: some shard twice ...
    assert len(np.unique(drawn)) > 0.5 * len(drawn)  # ... from the whole set (~63 % distinct)
    assert plans[0].order(1) != orders[0]  # a new draw each epoch

    plan = plans[2]
    for _ in range(1234):  # past the first epoch (250 draws x 5 samples), mid-unit, with a full buffer
        plan.draw()
    state = json.loads(json.dumps(plan.get_state()))
    expected = [plan.draw()[0] for _ in range(300)]
    resumed = StreamPlan(units, config, 2, 4)
    resumed.set_state(state)
    assert [resumed.draw()[0] for _ in range(300)] == expected
    with pytest.raises(DataError, match="process 2 of 4"):  # one process's position is never another's
        StreamPlan(units, config, 1, 4).set_state(state)
    with pytest.raises(DataError, match="resampled"):
        StreamPlan(units, StreamConfig(batch_size=8, seed=1, buffer=10), 2, 4).set_state(state)


def test_sample_ids_hold_any_shard_and_sample_count():
    # 100,000+ shards of 2^32 - 1 samples: beyond int32 (the bug: unit * 2^20 overflowed past 2,048 shards)
    ids = np.array([sample_id(u, o) for u in (0, 2_047, 2_049, 40_000, 2**31 - 1) for o in (0, 9_999, 2**32 - 1)],
                   np.int64)  # fmt: skip
    assert len(np.unique(ids)) == len(ids) and ids.max() > 2**31
    assert {int(i) >> 32 for i in ids} == {0, 2_047, 2_049, 40_000, 2**31 - 1}


def test_too_few_units_for_the_processes_is_a_clear_error_unless_resampled():
    with pytest.raises(DataError, match="3 units cannot give each of 4 processes one"):
        StreamPlan(VirtualUnits(np.full(3, 5)), StreamConfig(batch_size=8), 0, 4)
    plan = StreamPlan(VirtualUnits(np.full(3, 5)), StreamConfig(batch_size=8, resampled=True), 3, 4)
    assert len(plan.order(0)) == 1


def _arrayrecord(root, shards: int, per_shard: int, counts: bool = True) -> None:
    """`jaxmr data convert`'s layout with tiny records, written directly (a million in seconds)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from jaxmr.data.arrayrecord import encode_record, shard_name

    names = [shard_name("train", s, shards) for s in range(shards)]
    for s, name in enumerate(names):
        writer = ArrayRecordWriter(str(root / f"{name}.array_record"), "group_size:1")
        captions = []
        for i in range(per_shard):
            captions.append([f"caption {s}-{i}"])
            writer.write(encode_record(b"\xff", captions[-1], f"{s}-{i}", {}))
        writer.close()
        (root / f"{name}.captions.json").write_text(json.dumps(captions))
    split = {"shards": names, "records": shards * per_shard, **({"counts": [per_shard] * shards} if counts else {})}
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": split}, "skipped": {}}))


def test_arrayrecord_source_at_1m_records_holds_under_32_bytes_per_record(tmp_path):
    from jaxmr.data.arrayrecord import ArrayRecordSource

    shards, per_shard = 16, 62_500
    _arrayrecord(tmp_path, shards, per_shard)
    tracemalloc.start()
    source = ArrayRecordSource(tmp_path)  # all splits: train alone here
    rng = np.random.default_rng(0)
    reads = [source[int(i)] for i in rng.integers(len(source), size=200)]  # random reads over every shard
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del reads
    assert len(source) == shards * per_shard
    assert held <= 32 * len(source), held / len(source)  # was ~200 bytes a record: every caption in lists
    i = 3 * per_shard + 17
    record = source[i]
    assert record["captions"] == source.captions(i) == ["caption 3-17"] and record["id"] == "3-17"


def test_arrayrecord_source_counts_old_manifests_and_keeps_few_shards_open(tmp_path, monkeypatch):
    import jaxmr.data.arrayrecord as arrayrecord

    _arrayrecord(tmp_path, 12, 5, counts=False)  # a manifest from before the per-shard counts
    monkeypatch.setattr(arrayrecord, "OPEN_READERS", 4)
    source = arrayrecord.ArrayRecordSource(tmp_path)
    assert len(source) == 60
    assert [source[i]["id"] for i in range(0, 60, 5)] == [f"{s}-0" for s in range(12)]
    assert len(source._local.readers) == 4  # the 4 shards read last, the others closed
    assert list(source._local.readers) == [8, 9, 10, 11]
    with pytest.raises(IndexError):
        source[60]


def test_indexed_wds_source_starts_in_o_shards_heap_memory_mapped(tmp_path):
    import io
    import tarfile

    from jaxmr.data.shards import WebDatasetSource, index_shards

    shards, per_shard = 40, 250
    for s in range(shards):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext, data in (("jpg", b"\xff\xd8 not decoded here"), ("txt", f"caption {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    totals = index_shards(str(tmp_path), workers=1)
    assert (totals["shards"], totals["samples"], totals["skipped"]) == (shards, shards * per_shard, {})
    tracemalloc.start()
    source = WebDatasetSource(str(tmp_path))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # a path and a few mappings per shard, nothing per sample (numpy in memory was ~100 bytes a sample: 1 MB)
    assert held <= 1024 * shards + 64 * 1024, held
    assert len(source) == shards * per_shard
    record = source[7 * per_shard + 3]
    assert record["captions"] == ["caption 7 3"] and record["id"] == "00007.tar/000070003"
