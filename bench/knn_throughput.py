"""Batch kNN throughput on the mesh (`jaxmr index knn`): queries per second over a big index, extrapolated to
every vector of a 1M index as a query (1M x 1M, 100 neighbours each) from a measured slice.

    python -m bench.knn_throughput [--size 1e6] [--dim 256] [--queries 8192] [--k 100] [--quick]

One synthetic index (`bench.common.clustered_vectors`, float16 on disk, `--ann method=mesh`: no ScaNN build),
then in one run: `jaxmr.index.knn.knn` over a slice of its own vectors as queries, the vectors on the devices in
float32 and in bfloat16 (written to a parquet file as the CLI does; compile time excluded, the file's writing
included), and numpy exact search (`jaxmr.index.ann.exact_search`, the same k) over a smaller slice: the ratio
from one run. recall@k of bfloat16 against float32 on the slice. Results: bench/results/knn_throughput-<machine>.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import clustered_vectors, model_of_width, write_results


def run(size: int, dim: int, n_queries: int, k: int, workdir: str | None) -> tuple[list[dict], dict]:
    from jaxmr.index.ann import AnnConfig, exact_search
    from jaxmr.index.build import write_index
    from jaxmr.index.knn import KnnOptions, knn, load_mesh
    from jaxmr.index.store import live_arrays

    base, _, _ = clustered_vectors(size, dim, n_queries=1, seed=0)
    queries = np.asarray(base[:: max(1, size // n_queries)][:n_queries], np.float32)
    records, found = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = workdir or model_of_width(Path(tmp) / "run", dim)
        index = Path(tmp) / "index"
        start = time.perf_counter()
        write_index(index, workdir, base, ann=AnnConfig(method="mesh"), description=f"synthetic clustered {size}")
        print(f"index written in {time.perf_counter() - start:.1f} s")
        for dtype in ("float32", "bfloat16"):
            options = KnnOptions(k=k, dtype=dtype)
            t = time.perf_counter()
            mesh = load_mesh(live_arrays(index), options)
            placed = time.perf_counter() - t
            out = Path(tmp) / f"knn-{dtype}.parquet"
            summary = knn(index, queries, np.arange(len(queries)), out, options=options, progress=False, mesh=mesh)
            qps = summary["queries_per_second"]
            found[dtype] = mesh.search(queries[:1024], k)[0]
            records.append({"method": f"mesh {dtype}", "index": size, "dim": dim, "queries": len(queries), "k": k,
                            "devices": summary["devices"], "place_s": round(placed, 2),
                            "search_s": summary["search_seconds"], "queries_per_s": qps,
                            "pairs_bytes": out.stat().st_size,
                            "hours_all": round(size / qps / 3600, 2)})  # fmt: skip
            print(records[-1])
        few = queries[: min(1024, len(queries))]
        t = time.perf_counter()
        truth = exact_search(base, few, k)[0]
        numpy_s = time.perf_counter() - t
        qps = len(few) / numpy_s
        records.append({"method": "numpy exact", "index": size, "dim": dim, "queries": len(few), "k": k,
                        "search_s": round(numpy_s, 3), "queries_per_s": round(qps, 1),
                        "hours_all": round(size / qps / 3600, 2)})  # fmt: skip
        print(records[-1])
    recall = {d: float(np.mean([len(set(f) & set(t)) / k for f, t in zip(ids, truth, strict=True)]))
              for d, ids in found.items()}  # fmt: skip
    for r in records:
        r["recall_at_k"] = round(recall.get(r["method"].split()[-1], 1.0), 4)
    best = max(records[:2], key=lambda r: r["queries_per_s"])
    verdict = {"best": best["method"], "queries_per_s": best["queries_per_s"], "hours_all": best["hours_all"],
               "over_numpy": round(best["queries_per_s"] / records[-1]["queries_per_s"], 2)}  # fmt: skip
    return records, {"verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=1e6, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=8192, help="the measured slice of queries")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--workdir", default=None, help="a run or export of that width (default: train one)")
    parser.add_argument("--quick", action="store_true", help="20k x 32, 1,024 queries (CI smoke)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size, dim, n = (20_000, 32, 1024) if args.quick else (int(args.size), args.dim, args.queries)
    records, extra = run(size, dim, n, args.k, args.workdir)
    v = extra["verdict"]
    notes = (
        f"`jaxmr index knn` over {size} x {dim} synthetic clustered vectors (float16 on disk; the index's own "
        f"vectors as queries), k = {args.k}, on every device JAX sees ({records[0]['devices']}). Best: {v['best']}, "
        f"{v['queries_per_s']:.0f} queries/s, {v['over_numpy']:.2f}x numpy exact search in the same run. "
        f"hours_all: every vector of the index as a query ({size} x {size} / {args.k}) at this rate, extrapolated "
        "from the measured slice (the work per query does not depend on which queries). place_s: reading the rows "
        "and putting them on the devices; search_s: the searches and writing the pairs, compiling excluded. "
        "recall_at_k: against numpy exact search on the first 1,024 queries."
    )
    columns = ["method", "index", "dim", "queries", "k", "devices", "place_s", "search_s", "queries_per_s",
               "recall_at_k", "pairs_bytes", "hours_all"]  # fmt: skip
    path = write_results("knn_throughput", records, columns, "Batch kNN on the mesh", notes, args.out, extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
