"""Index writes at scale: what one add or delete costs over a big index, search with a delta, compaction.

    python -m bench.index_writes [--size 1e6] [--dim 256] [--workdir RUN] [--quick]

One synthetic index (`bench.common.clustered_vectors`, built by `write_index`: float16 on disk, the automatic
ANN settings, a SOAR tree at 1M), then, in one run:
1. single adds (one vector given, no encoder: `Searcher.add_vectors`) and single deletes: p50/p99 ms, the bytes
   each appends to the log, and the bytes the process sent to the disk meanwhile (/proc/self/io write_bytes: the
   fsynced pages), against what every write cost before the log: one whole version saved;
2. one query (p50/p99) and batches of 1,024 with a 10,000-vector delta (and the deletes' tombstones), recall@10
   against exact search over the live vectors, then the same after compacting it: a ratio from one run;
3. reopening the index with a 10% delta in its log (replay, and the first search, which upserts it), and its
   compaction while a search thread runs throughout: seconds, the thread's latencies, errors, and probes that
   missed (each probe is an added vector that must find itself: no gap).
Results: bench/results/index_writes-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import clustered_vectors, model_of_width, write_results

TARGETS = {"add_p50_ms": 20.0, "add_bytes": 64 * 1024, "delete_p50_ms": 20.0, "delete_bytes": 64 * 1024,
           "search_p50_over_compacted": 1.2, "recall_change": 0.005}  # fmt: skip


def _disk_writes() -> int:
    """Bytes this process caused to be written to storage (Linux /proc/self/io); 0 where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _latencies(fn, items) -> tuple[np.ndarray, list]:
    times, out = [], []
    for item in items:
        start = time.perf_counter()
        out.append(fn(item))
        times.append(time.perf_counter() - start)
    return np.asarray(times) * 1e3, out


def _stats(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def _recall(live, queries: np.ndarray) -> float:
    """recall@10 of a snapshot's search against exact search over its live vectors."""
    from jaxmr.index.ann import exact_search

    found = live.search(queries, 10)[0]
    truth = live.ids[exact_search(live.embeddings, queries, 10)[0]]
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def _search_records(snapshots: dict[str, object], queries: np.ndarray) -> list[dict]:
    """Each snapshot (a live collection) timed one query at a time, the snapshots taking turns in blocks of 100
    queries (side by side, since this machine's speed drifts; in blocks, since turns query by query made each
    evict the other's searcher from the cache), then a batch of 1,024 each, and recall@10."""
    for live in snapshots.values():
        live.search(queries[:1], 10)  # a first search upserts a delta into the searcher
    times = {name: [] for name in snapshots}
    for block in range(0, len(queries), 100):
        for name, live in snapshots.items():
            for q in queries[block : block + 100]:
                start = time.perf_counter()
                live.search(q[None], 10)
                times[name].append(time.perf_counter() - start)
    batch = np.resize(queries, (1024, queries.shape[1]))
    out = []
    for name, live in snapshots.items():
        start = time.perf_counter()
        live.search(batch, 10)
        batch_s = time.perf_counter() - start
        out.append({"stage": name, **live.counts, **_stats(np.asarray(times[name]) * 1e3),
                    "qps_batch1024": 1024 / batch_s, "recall_at_10": _recall(live, queries)})  # fmt: skip
    return out


def run(size: int, dim: int, workdir: str | None, singles: int, delta: int) -> tuple[list[dict], dict]:
    from jaxmr.index.build import write_index
    from jaxmr.index.store import Searcher, current_version, log_path

    records: list[dict] = []
    share = 0.1
    grow = int(share * size)
    database, text, _ = clustered_vectors(size + singles + delta + grow, dim, n_queries=1500)
    base, pool = database[:size], database[size:]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or model_of_width(Path(tmp) / "run", dim)
        index = Path(tmp) / "index"
        start = time.perf_counter()
        write_index(index, workdir, base, queries=text[:500], description=f"synthetic clustered {size}")
        build_s = time.perf_counter() - start
        del database, base
        searcher = Searcher(index, load_encoder=False)
        ann = searcher.manifest["images"]["ann"]
        print(f"built {size} x {dim} in {build_s:.0f} s ({ann['method']})", flush=True)
        queries = text[500:1500]
        before = _search_records({"search, before any write": searcher.collection("images")}, queries)[0]

        # 1. single writes, and the old way: a whole version per write
        log = log_path(current_version(index))
        for what, items, write in (
            ("add", [pool[i : i + 1] for i in range(singles)], searcher.add_vectors),
            ("delete", [[int(i)] for i in np.random.default_rng(0).choice(size, singles, replace=False)],
             searcher.delete),
        ):  # fmt: skip
            log_before = log.stat().st_size if log.exists() else 0
            disk_before = _disk_writes()
            ms, _ = _latencies(write, items)
            records.append({
                "stage": f"single {what}", **searcher.counts()["images"], **_stats(ms),
                "log_bytes_per_write": (log.stat().st_size - log_before) / singles,
                "disk_bytes_per_write": (_disk_writes() - disk_before) / singles,
            })  # fmt: skip
            print(records[-1], flush=True)
        old = Path(tmp) / "old-way"
        disk_before, start = _disk_writes(), time.perf_counter()
        searcher.collection("images").base.save(old)
        seconds, disk = time.perf_counter() - start, _disk_writes() - disk_before
        files = sum(p.stat().st_size for p in old.rglob("*") if p.is_file())
        records.append({"stage": "a whole version (each write's cost before the log)", "count": size,
                        "seconds": seconds, "disk_bytes_per_write": disk, "log_bytes_per_write": files})  # fmt: skip
        print(records[-1], flush=True)

        # 2. search with a delta, then compacted
        added = singles
        while added < singles + delta:
            step = min(1000, singles + delta - added)
            searcher.add_vectors(pool[added : added + step])
            added += step
        with_delta = searcher.collection("images")
        start = time.perf_counter()
        done = searcher.compact()
        records.append({"stage": f"compaction of the {delta}-vector delta", "count": done["images"]["count"],
                        "seconds": time.perf_counter() - start})  # fmt: skip
        records += [before, *_search_records({f"search, {delta} in the delta (the snapshot before compacting)":
                                              with_delta, "search, compacted": searcher.collection("images")},
                                             queries)]  # fmt: skip
        del with_delta
        print(records[-4:], flush=True)

        # 3. a 10% delta: reopen (replay), then compact while a search runs throughout
        first_new = added
        while added < singles + delta + grow:
            step = min(10_000, singles + delta + grow - added)
            searcher.add_vectors(pool[added : added + step])
            added += step
        del searcher
        start = time.perf_counter()
        searcher = Searcher(index, load_encoder=False)
        open_s = time.perf_counter() - start
        start = time.perf_counter()
        searcher.search(queries[:1], 10)
        records.append({"stage": f"reopen with {grow} logged adds (replay, then the first search's upsert)",
                        **searcher.counts()["images"], "seconds": open_s, "first_search_s": time.perf_counter() - start,
                        "log_bytes_per_write": searcher.counts()["log_bytes"]})  # fmt: skip
        print(records[-1], flush=True)
        probes = pool[first_new : first_new + 64]
        probe_ids = size + np.arange(first_new, first_new + 64)  # ids are handed out in the pool's order
        latencies, errors, misses, stop = [], [], [0], threading.Event()

        def search_throughout() -> None:
            n = 0
            while not stop.is_set():
                q = probes[n % len(probes)][None]
                t = time.perf_counter()
                try:
                    found = searcher.search(q, 10)[0][0]
                    misses[0] += int(probe_ids[n % len(probes)] not in found)
                except Exception as e:  # counted and reported
                    errors.append(repr(e))
                latencies.append(time.perf_counter() - t)
                n += 1

        thread = threading.Thread(target=search_throughout)
        thread.start()
        start = time.perf_counter()
        done = searcher.compact()
        compaction_s = time.perf_counter() - start
        time.sleep(0.5)
        stop.set()
        thread.join()
        ms = np.asarray(latencies) * 1e3
        records.append({"stage": f"compaction of a {share:.0%} delta, searching throughout",
                        "count": done["images"]["count"], "delta": done["images"]["delta"], "seconds": compaction_s,
                        **_stats(ms), "searches": len(ms), "errors": len(errors), "missed": misses[0]})  # fmt: skip
        print(records[-1], flush=True)
    before, with_delta, compacted = records[4], records[5], records[6]
    verdict = {
        "size": size, "dim": dim, "ann": f"{ann['method']} {ann.get('leaves_to_search')}/{ann.get('num_leaves')}",
        "add_p50_ms": records[0]["p50_ms"], "add_bytes": records[0]["disk_bytes_per_write"],
        "add_log_bytes": records[0]["log_bytes_per_write"], "delete_p50_ms": records[1]["p50_ms"],
        "delete_bytes": records[1]["disk_bytes_per_write"], "whole_version_s": records[2]["seconds"],
        "whole_version_bytes": records[2]["disk_bytes_per_write"],
        "search_p50_over_compacted": with_delta["p50_ms"] / compacted["p50_ms"],
        "search_p50_over_before": with_delta["p50_ms"] / before["p50_ms"],
        "recall_change": abs(with_delta["recall_at_10"] - before["recall_at_10"]),
        "recall_compacted_minus_delta": compacted["recall_at_10"] - with_delta["recall_at_10"],
        "compaction_10pct_s": records[-1]["seconds"], "compaction_search_errors": records[-1]["errors"],
        "compaction_search_missed": records[-1]["missed"], "build_s": build_s,
    }  # fmt: skip
    targets = {k: {"value": verdict[k], "threshold": v, "met": verdict[k] <= v} for k, v in TARGETS.items()}
    return records, {"verdict": verdict, "targets": targets}


def _target(name: str, target: dict) -> str:
    met = "met" if target["met"] else "NOT met"
    return f"{name} {target['value']:.4g} (<= {target['threshold']:g}: {met})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=1e6, help="vectors in the base")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workdir", default=None, help="a run or export of that width (default: train one)")
    parser.add_argument("--quick", action="store_true", help="20k x 32, 50 writes each, a 1k delta (CI smoke)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size, dim = (20_000, 32) if args.quick else (int(args.size), args.dim)
    singles, delta = (50, 1000) if args.quick else (200, 10_000)
    records, extra = run(size, dim, args.workdir, singles, delta)
    v = extra["verdict"]
    notes = (
        f"Index: {size} x {dim} synthetic clustered vectors (float16 on disk), {v['ann']}; built in "
        f"{v['build_s']:.0f} s. One single add (the vector given, no encoder) is acknowledged in "
        f"{v['add_p50_ms']:.2f} ms p50 and sends {v['add_bytes'] / 1024:.1f} KB to the disk "
        f"({v['add_log_bytes']:.0f} B of log record); a delete {v['delete_p50_ms']:.2f} ms and "
        f"{v['delete_bytes'] / 1024:.1f} KB. Before the log, each write saved a whole version: "
        f"{v['whole_version_s']:.1f} s and {v['whole_version_bytes'] / 1e6:.0f} MB here. Search with a {delta} "
        f"vector delta (and the deletes' tombstones): {v['search_p50_over_compacted']:.2f}x the compacted index's "
        f"p50 (timed side by side, in alternating blocks of 100 queries), {v['search_p50_over_before']:.2f}x "
        f"the index's before any write; recall@10 {v['recall_change']:.4f} from the index's before any write "
        f"(the same tree: what the delta costs), compacted {v['recall_compacted_minus_delta']:+.4f} from the "
        f"delta's (a tree trained anew, so it also varies by build). Compacting a 10% delta took "
        f"{v['compaction_10pct_s']:.0f} s with a search running throughout: "
        f"{v['compaction_search_errors']} errors, {v['compaction_search_missed']} probes "
        "missed. Disk bytes are /proc/self/io write_bytes (pages the fsyncs sent), log bytes the record sizes.\n\n"
        "Targets (issue 27): " + ", ".join(_target(k, t) for k, t in extra["targets"].items())
    )
    columns = ["stage", "base", "delta", "tombstones", "count", "p50_ms", "p99_ms", "max_ms", "qps_batch1024",
               "recall_at_10", "log_bytes_per_write", "disk_bytes_per_write", "seconds", "errors",
               "missed"]  # fmt: skip
    path = write_results("index_writes", records, columns, "Index writes: log records, delta search, compaction",
                         notes, args.out, extra)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
