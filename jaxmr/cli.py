"""The `jaxmr` console script. Each subcommand is a thin layer over the library; bad input ends in one
clear `error:` line and exit status 2, never a traceback.

The CLI is the top layer and may import any of the library. Each command imports the layers it runs inside its
handler, so that `jaxmr serve` loads the serving path only (no orbax, grain or training code: a server starts
faster and smaller) and `jaxmr data info` loads no model. These imports still run downward and are
checked by the layers contract (`make lint`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxmr import distributed
from jaxmr.config import ComposedConfig, apply_overrides, load_config_file
from jaxmr.data.records import DataError

SPEC_HELP = (
    "source spec: shapes[:n=10000,size=64,seed=0], captions:DIR, coco:DIR, tfds:NAME[:split], images:DIR, "
    "wds:PATTERN (tar shards), parquet:PATTERN[:image=COL,caption=COL]"
)


def _data_info(args: argparse.Namespace) -> None:
    from jaxmr.data import parse_source

    source = parse_source(args.source, args.split)
    n = len(source)
    captions = [len(source[i]["captions"]) for i in range(min(n, args.scan))]
    info = {
        "source": source.name,
        "split": source.split or "all",
        "images": n,
        "captions_per_image_mean": round(sum(captions) / max(len(captions), 1), 3),
        "scanned": len(captions),
        "example": {k: v for k, v in source[0].items() if k != "image"},
    }
    if hasattr(source, "split_sizes"):
        info["split_sizes"] = source.split_sizes
    if getattr(source, "skipped", None):  # shard sources: samples they could not use, by reason
        info["skipped"] = dict(source.skipped)
    print(json.dumps(info, indent=2, default=str))


def _data_preview(args: argparse.Namespace) -> None:
    from jaxmr.data import parse_source
    from jaxmr.viz import caption_grid

    source = parse_source(args.source, args.split)
    count = min(args.n, len(source))
    records = [source[i] for i in range(count)]
    caption_grid(records, args.out, image_size=args.size)
    print(f"wrote {args.out} ({count} images from {source.name})")


def _data_convert(args: argparse.Namespace) -> None:
    from jaxmr.data.convert import convert_to_arrayrecord

    m = convert_to_arrayrecord(args.source, args.out, shards=args.shards, workers=args.workers,
                               max_side=args.max_side, split=args.split, progress=not args.no_progress)  # fmt: skip
    records = sum(s["records"] for s in m["splits"].values())
    skipped = ", ".join(f"{n} {why}" for why, n in m["skipped"].items()) or "none"
    splits = ", ".join(f"{name} {s['records']} in {len(s['shards'])} shards" for name, s in m["splits"].items())
    print(f"{args.out}: {records} records ({splits}); skipped: {skipped}; {m['seconds']:.1f} s. Train on it with "
          f"--set data.source=arrayrecord:{args.out}")  # fmt: skip


def _data_index(args: argparse.Namespace) -> None:
    from jaxmr.data.shards import index_shards

    kind, _, pattern = args.source.strip().partition(":")
    if kind != "wds":
        raise DataError(f"data index reads wds: shards, not {args.source!r} (arrayrecord: keeps its own manifest)")
    totals = index_shards(pattern, workers=args.workers, progress=not args.no_progress)
    skipped = ", ".join(f"{n} {why}" for why, n in totals["skipped"].items()) or "none"
    print(f"{args.source}: {totals['samples']} samples in {totals['shards']} shards indexed into {totals['folder']}; "
          f"skipped: {skipped}")  # fmt: skip


def _data_to_tfds(args: argparse.Namespace) -> None:
    from jaxmr.data.convert import build_caption_folder

    path = build_caption_folder(args.source, args.out, name=args.name)
    print(f"wrote {path}; read it with --data tfds:caption_folder/{path.parent.name} and TFDS_DATA_DIR={args.out}")


def _tokenizer_train(args: argparse.Namespace) -> None:
    from jaxmr.data import caption_table, parse_source
    from jaxmr.text import train_bpe

    texts, _ = caption_table(parse_source(args.source, args.split))
    tokenizer = train_bpe(texts, vocab_size=args.vocab_size, max_len=args.max_len)
    tokenizer.save(args.out)
    print(f"trained a {tokenizer.vocab_size}-token BPE vocabulary on {len(texts)} captions -> {args.out}")


def _model_import(args: argparse.Namespace) -> None:
    from jaxmr.convert import import_model

    fingerprint = import_model(args.source, args.out, args.tokenizer)
    print(f"wrote {args.out} (fingerprint {fingerprint}); index with: jaxmr index build --workdir {args.out} ...")


def _model_export(args: argparse.Namespace) -> None:
    from jaxmr.training.exports import export_model

    print(f"wrote {args.out} (fingerprint {export_model(args.workdir, args.out)})")


def _model_info(args: argparse.Namespace) -> None:
    from jaxmr.models import PRESETS, parameter_counts

    names = args.presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset {unknown[0]!r}; presets: {', '.join(PRESETS)}")
    print(f"{'preset':<10} {'image':>14} {'text':>14} {'total':>14}")
    for name in names:
        counts = parameter_counts(PRESETS[name])
        print(f"{name:<10} {counts['image']:>14,} {counts['text']:>14,} {counts['total']:>14,}")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant][,key=value,...]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed when it holds a run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (resumable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)


def _train(args: argparse.Namespace) -> None:
    from jaxmr.training import composed
    from jaxmr.training.loop import train

    config = apply_overrides(load_config_file(args.config), args.set)
    multi = distributed.initialize(args)  # before anything asks JAX for devices
    if isinstance(config, ComposedConfig):  # composed queries on top of a trained dual encoder
        if multi:
            raise ValueError("the composed-query trainer runs in one process (it trains in minutes on one device)")
        metrics = composed.train(config, args.workdir, progress=not args.no_progress)
    else:
        metrics = train(config, args.workdir, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    if metrics and distributed.is_primary():
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def _eval(args: argparse.Namespace) -> None:
    from jaxmr.training import composed
    from jaxmr.training.runs import evaluate

    if composed.is_composed_run(args.workdir):  # image + text -> image: the composer and both baselines
        metrics = composed.evaluate(args.workdir, args.data, args.split)
        if args.json:
            print(json.dumps(metrics))
        else:
            composed.print_table(metrics)
        return

    if args.report or args.labelled:
        _eval_report(args)
        return
    metrics = evaluate(args.workdir, args.data, args.split)
    if args.json:
        keys = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_median_rank", "i2t_median_rank",
                "n_images", "n_captions")  # fmt: skip
        print(json.dumps({k: metrics[k] for k in keys}))
        return
    from jaxmr.demo import print_table

    print_table(metrics)


def _eval_report(args: argparse.Namespace) -> None:
    from jaxmr import report
    from jaxmr.data import parse_source
    from jaxmr.evaluators import ClassPrecision, EncoderEmbedder
    from jaxmr.training.runs import load_encoder

    templates = tuple(args.prompt) or None  # None: the labelled source's own, or jaxmr.metrics.TEMPLATES
    bad = [t for t in args.prompt if t.count("{}") != 1]
    if bad:
        raise ValueError(f"a prompt template needs exactly one {{}} for the class name, got {bad[0]!r}")
    if args.report:
        metrics = report.write_report(args.workdir, args.report, args.data, args.split, args.labelled, templates,
                                      progress=not args.json)  # fmt: skip
        if args.json:
            print(json.dumps(metrics, default=float))
        else:
            print(f"wrote {Path(args.report) / 'report.md'} and report.html")
        return
    evaluator = ClassPrecision(parse_source(args.labelled, args.split), templates)
    classes = evaluator.report(EncoderEmbedder(load_encoder(args.workdir)), progress=not args.json)
    if args.json:
        print(json.dumps(classes))
        return
    print(report.class_table(classes))
    print(f"zero-shot top-1 {classes['zero_shot_top1']:.3f}, top-5 {classes['zero_shot_top5']:.3f} "
          f"({classes['n_images']} images, {classes['n_classes']} classes)")  # fmt: skip


def _index_build(args: argparse.Namespace) -> None:
    from jaxmr.index.ann import AnnConfig
    from jaxmr.index.build import BuildOptions, build_index

    options = BuildOptions(
        captions=not args.no_captions, chunk=args.chunk, batch_size=args.batch_size, dtype=args.dtype,
        ann=AnnConfig.from_spec(args.ann),
    )  # fmt: skip
    distributed.initialize(args)  # before anything asks JAX for devices
    start = time.perf_counter()
    searcher = build_index(args.workdir, args.source, args.out, args.split, options, progress=not args.no_progress)
    if searcher is None:  # another process of a multi-process build; process 0 reports
        return
    m = searcher.manifest
    captions = m["captions"]["count"] if m["captions"] else 0
    print(
        f"index {args.out}: {m['images']['count']} images ({m['images']['ann']['method']}), {captions} captions, "
        f"{m['images']['unreadable']} unreadable; {time.perf_counter() - start:.1f} s"
    )


def _index_info(args: argparse.Namespace) -> None:
    from jaxmr.index.store import index_info

    print(json.dumps(index_info(args.index), indent=2))


def _index_verify(args: argparse.Namespace) -> None:
    from jaxmr.index.store import verify_index

    m = verify_index(args.index)
    live = m["live"]
    captions = live["captions"]["count"] if live["captions"] else 0
    print(f"{args.index}: version {m['version']} and {live['log_writes']} logged writes are sound: "
          f"{live['images']['count']} images, {captions} captions; sizes, checksums, counts, the log's records "
          "and ids checked, the searchers load")  # fmt: skip


def _index_compact(args: argparse.Namespace) -> None:
    from jaxmr.index.store import Searcher

    searcher = Searcher(args.index, load_encoder=False)
    done = searcher.compact()
    if done is None:
        print(f"{args.index}: nothing to compact (version {searcher.version}, no writes logged over it)")
        return
    images = done["images"]
    print(f"{args.index}: version {done['from_version']} + {done['folded_writes']} logged writes -> version "
          f"{done['version']}: {images['count']} images ({images['delta']} added, {images['tombstones']} deleted "
          f"folded in), {done['carried_writes']} made meanwhile carried over; {done['seconds']:.1f} s")  # fmt: skip


def _knn_queries(args: argparse.Namespace, index: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """--queries as (vectors [Q, E], ids [Q], what they are): the index's own targets, a .npy file, another index
    made by the same model (DIR or DIR:captions), or a source spec whose images the index's model embeds."""
    from jaxmr.index.store import live_arrays, read_manifest

    spec = args.queries
    if spec in ("images", "captions"):
        own = live_arrays(index, spec)
        return own.vectors[:][own.valid], own.ids[own.valid], f"the index's own {spec}"
    if spec.endswith(".npy"):
        vectors = np.load(spec, allow_pickle=False)
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(f"{spec}: queries must be a float array [Q, E], got {vectors.dtype} {vectors.shape}")
        return vectors.astype(np.float32), np.arange(len(vectors), dtype=np.int64), f"{spec} (ids = row numbers)"
    folder, _, part = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if (Path(folder) / "current").exists():
        theirs, ours = read_manifest(folder)["model"]["fingerprint"], read_manifest(index)["model"]["fingerprint"]
        if theirs != ours:
            raise ValueError(f"the query index {folder} was made by another model (fingerprint {theirs}, not {ours})")
        other = live_arrays(folder, part or "images")
        return other.vectors[:][other.valid], other.ids[other.valid], f"{folder}'s {part or 'images'}"
    from jaxmr.encoder import Encoder
    from jaxmr.index.build import embed_source_images

    vectors, numbers = embed_source_images(Encoder.load(index / "model"), spec, args.split,
                                           progress=not args.no_progress)  # fmt: skip
    return vectors, numbers, f"the images of {spec} (ids = record numbers)"


def _index_knn(args: argparse.Namespace) -> None:
    from jaxmr.index.knn import KnnOptions, knn

    options = KnnOptions(k=args.k, threshold=args.threshold, exclude_self=args.exclude_self, batch=args.batch,
                         dtype=args.dtype, approx=args.approx)  # fmt: skip
    distributed.initialize(args)  # before anything asks JAX for devices
    index = Path(args.index)
    queries, ids, what = _knn_queries(args, index)
    done = knn(index, queries, ids, args.out, args.target, options, progress=not args.no_progress)
    if args.json:  # every process: what it held
        print(json.dumps(dict(done, queries_from=what, process=distributed.share()[0])))
        return
    if not distributed.is_primary():
        return
    kept = f" scoring >= {args.threshold}" if args.threshold is not None else ""
    print(f"{args.out}: {done['pairs']} (query, neighbour) pairs{kept} for {done['queries']} queries ({what}) over "
          f"{done['live']} {args.target}; {done['queries_per_second']:.0f} queries/s on {done['devices']} "
          f"device(s) of {done['processes']} process(es)")  # fmt: skip


def _index_search(args: argparse.Namespace) -> None:
    from jaxmr.index.store import Searcher

    if not args.query.strip():
        raise ValueError("the query is empty")
    searcher = Searcher(args.index)
    ids, scores = searcher.search_text([args.query], args.k, args.target, exact=args.exact)
    records = searcher.records(ids[0], args.target)
    if args.grid:
        from jaxmr.viz import result_grid

        image_ids = [r["id"] if args.target == "images" else r["image_id"] for r in records]
        files = [searcher.image_file(i) for i in image_ids]
        labels = [f"#{rank} {score:.3f} id {i}" for rank, (i, score) in enumerate(zip(image_ids, scores[0],
                                                                                      strict=True), 1)]  # fmt: skip
        if not records:
            raise ValueError("no results to draw: the index is empty")
        result_grid([str(f) if f else np.zeros((8, 8, 3), np.uint8) for f in files], labels, args.grid,
                    f'"{args.query}"')  # fmt: skip
        print(f"wrote {args.grid}: the top {len(records)} for {args.query!r}")
    if args.json:
        print(json.dumps([dict(r, score=float(s)) for r, s in zip(records, scores[0], strict=True)]))
        return
    for rank, (record, score) in enumerate(zip(records, scores[0], strict=True), 1):
        what = record["text"] if args.target == "captions" else record["path"]
        extra = f"  {record['captions'][0]}" if args.target == "images" and record["captions"] else ""
        print(f"{rank:>3}  {score:.3f}  id {record['id']:<8} {what}{extra}")


def _serve(args: argparse.Namespace) -> None:
    from jaxmr.serving.app import run
    from jaxmr.serving.settings import Settings

    settings = Settings.from_env(index=args.index, host=args.host, port=args.port, api_key=args.api_key,
                                 backend=args.backend)  # fmt: skip
    if not settings.index:
        raise ValueError("which index? give --index INDEX_DIR (or set JAXMR_INDEX)")
    run(settings)


def _demo(args: argparse.Namespace) -> None:
    from jaxmr.demo import run_demo

    run_demo(Path(args.workdir), args.config, photos=Path(args.photos) if args.photos else None,
             serve=not args.no_serve, host=args.host, port=args.port, progress=not args.no_progress,
             photo_model=Path(args.photo_model) if args.photo_model else None)  # fmt: skip


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmr", description="Cross-modal retrieval: train, index, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run: Callable[[argparse.Namespace], None], help: str, parent=commands):
        sub = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    demo = add("demo", _demo, "run the product end to end on the built-in shapes world")
    demo.add_argument("--workdir", default="runs/demo", help="where runs and artifacts go (reused when present)")
    demo.add_argument("--config", default=None, help="a config to train instead of configs/shapes_tiny.py")
    demo.add_argument("--photos", default=None, help="index and serve this folder of your own images instead")
    demo.add_argument("--photo-model", default=None, help="the run or export that embeds --photos (default: "
                      "runs/flickr8k_lit when trained, else the demo model)")  # fmt: skip
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on")
    demo.add_argument("--port", type=_port, default=8000, help="port to serve on")
    demo.add_argument("--no-serve", action="store_true", help="stop after building the index")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    _train_arguments(add("train", _train, "train a dual encoder from a config file (resumes a workdir)"))
    evaluate = add("eval", _eval, "Recall@K of a run's latest checkpoint on its eval split or any source")
    evaluate.add_argument("--workdir", required=True, help="a training run directory")
    evaluate.add_argument("--data", default=None, help=f"{SPEC_HELP} (default: the run's own)")
    evaluate.add_argument("--split", default=None, help="train | val (= dev) | test (default: the run's eval split)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--labelled", default=None, metavar="SPEC",
                          help="class-name precision@10/100 and zero-shot accuracy on a class-labelled set "
                               "(labelled:DIR, tfds:NAME, shapes) instead of recall@K")  # fmt: skip
    evaluate.add_argument("--prompt", action="append", default=[], metavar="TEMPLATE",
                          help='a class-name prompt template with {} (repeatable; default: "a photo of a {}." and '
                               "five more)")  # fmt: skip
    evaluate.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="write a report (markdown + HTML: tables, PR curve, t-SNE, result grids) to DIR",
    )

    data = commands.add_parser("data", help="inspect, preview and convert data sources")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    info = add("info", _data_info, "print a source's size, splits and one record", data_commands)
    preview = add("preview", _data_preview, "save a grid of images with their first caption", data_commands)
    to_tfds = add("to-tfds", _data_to_tfds, "convert a caption folder to a TFDS ArrayRecord dataset", data_commands)
    convert = add("convert", _data_convert, "convert any source (wds:, parquet:, a caption folder ...) to "
                  "ArrayRecord shards, resumable and in parallel; read back as arrayrecord:DIR",
                  data_commands)  # fmt: skip
    index_data = add("index", _data_index, "index every tar of a wds: pattern once, ahead of training (member "
                     "offsets, keys, splits; cached under $JAXMR_CACHE/shards)", data_commands)  # fmt: skip
    index_data.add_argument("--workers", type=_positive, default=1, help="processes indexing shards at once")
    index_data.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.add_argument("--out", required=True, help="directory to write the shards and manifest.json into")
    convert.add_argument("--shards", type=_positive, default=None, help="shards in all (default: 4,096 records each)")
    convert.add_argument("--workers", type=_positive, default=1, help="processes converting shards at once")
    convert.add_argument("--max-side", type=_positive, default=384, help="longer side of the stored images")
    convert.add_argument("--split", default="all", help="train | val (= dev) | test | all (each kept as itself)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    for sub in (info, preview, to_tfds, convert, index_data):
        sub.add_argument("source", help=SPEC_HELP)
    for sub in (info, preview):
        sub.add_argument("--split", default="train", help="train | val (= dev) | test | all")
    info.add_argument("--scan", type=int, default=1000, help="records to scan for caption statistics")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--n", type=int, default=16, help="number of images")
    preview.add_argument("--size", type=int, default=128, help="tile side in pixels")
    to_tfds.add_argument("--out", required=True, help="TFDS data_dir to write into")
    to_tfds.add_argument("--name", default=None, help="config name (default: the folder's name)")

    index = commands.add_parser("index", help="build, inspect and query search indexes")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = add("build", _index_build, "embed a source with a trained model into a ScaNN index", index_commands)
    build.add_argument("--workdir", required=True, help="a training run directory (or a model export)")
    build.add_argument("--source", required=True, help=SPEC_HELP)
    build.add_argument("--split", default="all", help="train | val (= dev) | test | all (default: all)")
    build.add_argument("--out", required=True, help="index directory to write (resumes an interrupted build)")
    build.add_argument("--no-captions", action="store_true", help="index images only")
    build.add_argument("--chunk", type=_positive, default=4096, help="images per resumable chunk")
    build.add_argument("--batch-size", type=_positive, default=256, help="images per encoder call")
    build.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="embeddings on disk")
    build.add_argument("--ann", action="append", default=[], metavar="KEY=VALUE",
                       help="search setting, e.g. method=tree_ah, leaves_to_search=64, reorder=256; "
                       "method=mesh [approx=0.95] [device_dtype=float32] for the devices")  # fmt: skip
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(build)
    info_index = add("info", _index_info, "print an index's manifest, live counts (base, delta, tombstones) and "
                     "log size (after the cheap checks of verify)",
                     index_commands)  # fmt: skip
    info_index.add_argument("index", help="index directory")
    verify = add("verify", _index_verify, "check an index: file sizes and checksums, counts, unique ids, that the "
                 "searchers load; exit 2 naming the first problem", index_commands)  # fmt: skip
    verify.add_argument("index", help="index directory")
    compact = add("compact", _index_compact, "fold an index's logged adds and deletes into a new base version "
                  "(searches and writes go on meanwhile)", index_commands)  # fmt: skip
    compact.add_argument("index", help="index directory")
    knn_cmd = add("knn", _index_knn, "nearest neighbours of many queries on the devices (all processes), written "
                  "as (query, neighbor, rank, score) parquet; with --threshold, near-duplicate pairs",
                  index_commands)  # fmt: skip
    knn_cmd.add_argument("index", help="index directory")
    knn_cmd.add_argument("--queries", required=True, help="images | captions (the index's own), FILE.npy "
                         "(float [Q, E]), another index made by the same model (DIR[:captions]), or a source spec "
                         "whose images the index's model embeds")  # fmt: skip
    knn_cmd.add_argument("--split", default="all", help="with a source spec: its split (default: all)")
    knn_cmd.add_argument("--target", default="images", choices=("images", "captions"), help="what to search")
    knn_cmd.add_argument("-k", "--k", type=_positive, default=100, help="neighbours per query")
    knn_cmd.add_argument("--threshold", type=float, default=None, help="keep pairs scoring at least this")
    knn_cmd.add_argument("--exclude-self", action="store_true", help="drop each query's own id from its neighbours")
    knn_cmd.add_argument("--batch", type=_positive, default=1024, help="queries per search")
    knn_cmd.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="vectors on the devices")
    knn_cmd.add_argument("--approx", type=float, default=0.0, help="recall target of approx_max_k (0: exact)")
    knn_cmd.add_argument("--out", required=True, help="parquet file to write")
    knn_cmd.add_argument("--json", action="store_true", help="print the summary as JSON (each process its own)")
    knn_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(knn_cmd)
    search = add("search", _index_search, "search an index with a text query", index_commands)
    search.add_argument("index", help="index directory")
    search.add_argument("query", help="the text to search for")
    search.add_argument("-k", type=_positive, default=10, help="number of results")
    search.add_argument("--target", default="images", choices=("images", "captions"), help="what to return")
    search.add_argument("--exact", action="store_true", help="exact search instead of ScaNN")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("--grid", default=None, metavar="PNG", help="also save the results as an image grid")

    serve = add("serve", _serve, "serve search over an index: JSON API, web UI, metrics")
    serve.add_argument("--index", default=None, help="index directory (or JAXMR_INDEX)")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or JAXMR_HOST)")
    serve.add_argument("--port", type=_port, default=None, help="port (default 8000, or JAXMR_PORT)")
    serve.add_argument("--api-key", default=None, help="key for uploads and deletes (or JAXMR_API_KEY)")
    serve.add_argument("--backend", default=None, choices=("mesh", "scann"),
                       help="search on the devices JAX sees (mesh) or with ScaNN on the host (default: what the "
                       "index was built for; or JAXMR_BACKEND)")  # fmt: skip

    model = commands.add_parser("model", help="inspect presets, import CLIP / SigLIP checkpoints, export runs")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    model_info = add("info", _model_info, "print parameter counts of model presets", model_commands)
    model_info.add_argument("presets", nargs="*", help="preset names (default: all)")
    model_import = add("import", _model_import, "convert a CLIP or SigLIP checkpoint into a jaxmr model export",
                       model_commands)  # fmt: skip
    model_import.add_argument("source", help="a Hugging Face CLIPModel / SiglipModel folder, or an OpenAI/OpenCLIP "
                              "state dict (.pt, .bin, .safetensors)")  # fmt: skip
    model_import.add_argument("--out", required=True, help="export directory to write")
    model_import.add_argument("--tokenizer", default=None, help="a Hugging Face CLIP tokenizer folder (needed for "
                              "OpenAI/OpenCLIP state dicts)")  # fmt: skip
    model_export = add("export", _model_export, "write a run's checkpoint as a model export", model_commands)
    model_export.add_argument("--workdir", required=True, help="a training run directory")
    model_export.add_argument("--out", required=True, help="export directory to write")

    tok = commands.add_parser("tokenizer", help="train a caption tokenizer")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train_tok = add("train", _tokenizer_train, "learn a BPE vocabulary from a source's captions", tok_commands)
    train_tok.add_argument("source", help=SPEC_HELP)
    train_tok.add_argument("--split", default="train")
    train_tok.add_argument("--out", required=True, help="directory to save tokenizer.json into")
    train_tok.add_argument("--vocab-size", type=int, default=8192)
    train_tok.add_argument("--max-len", type=int, default=32)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our messages at INFO, the libraries' (orbax, absl) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", force=True)
    logging.getLogger("jaxmr").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    try:
        args.run(args)
    except (DataError, ValueError, OSError) as e:  # bad input, a file where a folder goes, a symlink loop ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    logging.getLogger(__name__).debug("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
