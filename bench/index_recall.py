"""Recall@10 of the ScaNN searcher against exact search, text->image and image->image, separately.

    python -m bench.index_recall --index shapes=runs/demo/index --index flickr8k_dev=runs/flickr8k/index \
        --synthetic 1000000 --dim 256

For a real index, the text queries are its own captions and the image queries its own images; besides the
configuration the index was built with, the ScaNN methods are forced in turn (ah, tree_ah) on the same vectors.
The synthetic set is `bench.common.clustered_vectors` (clustered, with a modality gap).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import clustered_vectors, write_results
from jaxmr.index.ann import AnnConfig, exact_search
from jaxmr.index.collection import Collection
from jaxmr.index.store import Searcher
from jaxmr.options import key_value


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / t.size for f, t in zip(found, truth, strict=True)]))


def measure(
    name: str, vectors: np.ndarray, queries: dict[str, np.ndarray], configs: dict[str, AnnConfig], calibration=None
) -> list:
    """Recall and speed of each config on `vectors`; trees are calibrated on `calibration` (queries held out
    from the measured ones)."""
    import pyarrow as pa

    records = []
    ids = np.arange(len(vectors), dtype=np.int64)
    meta = pa.table({"id": ids})
    truth = {kind: exact_search(vectors, q, 10)[0] for kind, q in queries.items()}
    for label, config in configs.items():
        start = time.perf_counter()
        collection = Collection.create(ids, vectors, meta, config, queries=calibration)
        build_s = time.perf_counter() - start
        for kind, q in queries.items():
            collection.search(q[:8], 10)  # warm
            start = time.perf_counter()
            found, _ = collection.search(q, 10)
            ms = (time.perf_counter() - start) / len(q) * 1e3
            ann = collection.ann
            records.append({
                "set": name, "n": len(vectors), "d": vectors.shape[1], "queries": kind, "config": label,
                "method": ann.method, "leaves": f"{ann.leaves_to_search}/{ann.num_leaves}" if ann.num_leaves else "-",
                "recall_at_10": recall_at(found, truth[kind]), "ms_per_query_batched": ms, "build_s": build_s,
            })  # fmt: skip
            print(records[-1], flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", action="append", default=[], metavar="NAME=DIR", help="a built index")
    parser.add_argument("--synthetic", type=float, default=0, help="size of the synthetic set (0: none)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--notes", default="", help="a sentence for the results (which models built the indexes)")
    parser.add_argument("--quick", action="store_true", help="a 20k synthetic set only (CI smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.index, args.synthetic, args.queries = [], 20_000, 200
    records = []
    rng = np.random.default_rng(0)
    for item in args.index:
        name, path = key_value(item, "name=path")
        searcher = Searcher(path, load_encoder=False)
        images = np.asarray(searcher.collection("images").embeddings, np.float32)
        captions = np.asarray(searcher.collection("captions").embeddings, np.float32)
        order = rng.permutation(len(captions))
        queries = {
            "text->image": captions[order[: args.queries]],
            "image->image": images[rng.choice(len(images), min(args.queries, len(images)), replace=False)],
        }
        configs = {"as built (auto)": AnnConfig(**searcher.manifest["images"]["ann"]),
                   "forced ah": AnnConfig(method="ah"), "forced tree_ah": AnnConfig(method="tree_ah")}  # fmt: skip
        records += measure(name, images, queries, configs, calibration=captions[order[args.queries :]])
    if args.synthetic:
        n = int(args.synthetic)
        database, text, image = clustered_vectors(n, args.dim, 2 * args.queries)
        queries = {"text->image": text[: args.queries], "image->image": image[: args.queries]}
        records += measure(f"synthetic {n:.0e}", database, queries, {"auto": AnnConfig()}, text[args.queries :])
    columns = ["set", "n", "d", "queries", "config", "method", "leaves", "recall_at_10", "ms_per_query_batched",
               "build_s"]  # fmt: skip
    notes = (
        "Recall@10 against exact search (the same vectors, numpy matmul). Text queries are the index's captions, "
        "image queries its images; trees are calibrated on other captions (synthetic: other text "
        "queries). ms_per_query_batched: one `search_batched` call over all queries, divided."
    )
    notes = f"{notes} {args.notes}".strip()
    path = write_results("index_recall", records, columns, "ScaNN recall against exact search", notes, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
