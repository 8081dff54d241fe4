"""The README's headline figures, written from (or checked against) the committed results in bench/results/.

    python -m bench.headline --write     # rewrite the table between the README's headline markers
    python -m bench.headline --check     # exit 1, naming each row, when a figure has no record or differs from it
    python -m bench.headline             # print the table

Each row is a template over one or more result files (`bench/results/NAME.json`, as `bench.common.write_results`
writes them) and names those files and the command that made them. A figure is never typed into the README:
`tests/test_headline.py` runs the check, so a result re-measured without a README update (or a README figure
with no result) fails `make test`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- headline: written by `python -m bench.headline --write` from bench/results; checked by make test -->"
END = "<!-- /headline -->"


class MissingRecord(LookupError):
    """A row's result file, or the record it reads, is not there."""


class Results:
    """The result files of one folder, loaded on first use; `pick` finds one record by its fields."""

    def __init__(self, folder: Path = RESULTS) -> None:
        self.folder = Path(folder)
        self._loaded: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        if name not in self._loaded:
            path = self.folder / f"{name}.json"
            if not path.is_file():
                raise MissingRecord(f"no result file {path}")
            self._loaded[name] = json.loads(path.read_text())
        return self._loaded[name]

    def key(self, name: str, *path: str):
        """A value inside a result file, by its keys: key("search_1m-cpu2", "verdict", "ratio")."""
        value = self(name)
        for part in path:
            if not isinstance(value, dict) or part not in value:
                raise MissingRecord(f"{name}.json has no {'.'.join(path)}")
            value = value[part]
        return value

    def pick(self, name: str, **fields) -> dict:
        """The one record of `name` whose fields equal `fields`."""
        found = [r for r in self(name).get("records", []) if all(r.get(k) == v for k, v in fields.items())]
        if len(found) != 1:
            raise MissingRecord(f"{name}.json: {len(found)} records with {fields}, not one")
        return found[0]

    def date(self, name: str) -> str:
        return self.key(name, "machine", "date")[:10]


@dataclasses.dataclass(frozen=True)
class Row:
    what: str  # the first cell (markdown, links to the page that explains the figure)
    figure: Callable[[Results], str]
    files: tuple[str, ...]  # result names under bench/results, without .json
    command: str


def ratio(block: dict) -> str:
    """A ratio measured in alternating blocks: "1.42x (1.35-1.49), ahead", "0.86x (0.78-0.90), behind", or a tie
    when the min-max includes 1."""
    spread = f"{block['min']:.2f}-{block['max']:.2f}"
    if block["tie"]:
        return f"a tie ({block['median']:.2f}x, {spread})"
    return f"{block['median']:.2f}x ({spread}), {'ahead' if block['min'] > 1 else 'behind'}"


def _shapes(r: Results) -> str:
    demo = r.key("shapes_default-cpu2", "demo")
    test = r.pick("shapes_default-cpu2", split="test")
    return (
        f"**{test['t2i_r1']:.3f} / {test['t2i_r5']:.3f}** after {demo['steps']:,} steps: `jaxmr demo` "
        f"{demo['wall_s'] / 60:.1f} min in all, training {demo['train_s'] / 60:.1f} min at "
        f"~{demo['examples_per_s']:.0f} examples/s ({100 * demo['data_wait_share']:.1f} % of it waiting for "
        f"data), on a fresh clone ({r.date('shapes_default-cpu2')})"
    )


def _lit(r: Results) -> str:
    default = r.pick("lit_default-cpu2", variant="base")
    lite0 = r.pick("lit_ablation-cpu2", variant="base")  # the Lite0 + MiniLM recipe, 4 views
    minilm = r.pick("lit_ablation-cpu2", variant="lite2+views1")
    fresh = "from scratch" if r.key("lit_default-cpu2", "fresh_features") else "features cached"
    return (
        f"**{default['t2i_r1']:.3f} / {default['i2t_r1']:.3f}**, {default['wall_s'] / 60:.0f} min {fresh} on 2 cores "
        f"(Lite0 + MiniLM: {lite0['t2i_r1']:.3f} / {lite0['i2t_r1']:.3f}); Lite2 + MiniLM (default install only) "
        f"{minilm['t2i_r1']:.3f} / {minilm['i2t_r1']:.3f}"
    )


def _composed(r: Results) -> str:
    composer = r.pick("composed-cpu2", query="trained composer (TIRG)")
    image = r.pick("composed-cpu2", query="reference image only")
    added = r.pick("composed-cpu2", query="normalised sum of image and text embeddings")
    return f"**{composer['r1']:.3f}** vs {image['r1']:.3f} (image + text summed: {added['r1']:.3f})"


def _train_step(r: Results) -> str:
    tiny = r.pick("train_throughput-cpu2", model="tiny")["ratio_jaxmr_over_torch"]
    s16 = r.pick("train_throughput-cpu2", model="s16")["ratio_jaxmr_over_torch"]
    return f"tiny {tiny:.2f}x, s16 {s16:.2f}x (one run each)"


def _search(r: Results) -> str:
    v = r.key("search_1m-cpu2", "verdict")
    return (
        f"**{v['scann_recall_at_10']:.3f}**, **{v['scann_p50_ms']:.2f} ms**; against FAISS HNSW at equal recall "
        f"{ratio(v['over_hnsw_single'])} ({v['blocks']} alternating blocks); "
        f"{v['over_numpy_batch1024']['median']:.0f}x exact numpy batched; {v['scann_params']}"
    )


def _serving(r: Results) -> str:
    one = r.pick("serve_load-cpu2", clients=1)
    many = r.pick("serve_load-cpu2", clients=32)
    minilm = r.pick("serve_load_text_towers-cpu2", text_tower="MiniLM (BERT)", clients=1)
    mpnet = r.pick("serve_load_text_towers-cpu2", text_tower="MPNet", clients=1)
    return (
        f"the shapes demo's tiny text tower, {one['index_size']:,} x {one['dim']}: p50 {one['p50_ms']:.1f} ms for one "
        f"client, {many['requests_per_s']:.0f} requests/s at 32; LiT's towers at {minilm['index_size']:,} x "
        f"{minilm['dim']}: MiniLM p50 {minilm['p50_ms']:.1f} ms, MPNet {mpnet['p50_ms']:.1f} ms (the text tower's "
        "forward is most of it)"
    )


def _knn(r: Results) -> str:
    v = r.key("knn_throughput-cpu2", "verdict")
    return (
        f"{v['queries_per_s']:.0f} queries/s on these 2 cores ({v['over_numpy']:.2f}x numpy exact): the whole "
        f"1M x 1M in {v['hours_all']:.1f} h"
    )


def _shards(r: Results) -> str:
    def over(workers: int) -> float:
        ours = r.pick("input_pipeline_shards-cpu2", source="wds", workers=workers)["images_per_s"]
        theirs = r.pick("input_pipeline_shards-cpu2", source="wds (webdataset + torch DataLoader)", workers=workers)
        return ours / theirs["images_per_s"]

    source = r.pick("shard_training-cpu2", data="source")["test_t2i_r1"]
    converted = [x for x in r("shard_training-cpu2")["records"] if x["data"].startswith("arrayrecord")]
    if len(converted) != 1:
        raise MissingRecord("shard_training-cpu2.json: no one arrayrecord record")
    same = "the same" if converted[0]["test_t2i_r1"] == source else "not the same"
    return (
        f"**{over(1):.2f}x** with 1 worker, {over(2):.2f}x with 2; training from a conversion: {same} recall "
        f"({source:.4f} / {converted[0]['test_t2i_r1']:.4f})"
    )


def _webscale(r: Results) -> str:
    def planner(shards: int) -> dict:
        return r.pick("webscale_planner-cpu2", part="stream planner", shards=shards, samples=400_000_000)

    a, b = planner(40_000), planner(100_000)
    heap = "arrayrecord source heap, 1M records (bytes a record)"
    ours = r.pick("webscale_planner-cpu2", part=heap, tree="this tree")["bytes_per_record"]
    base = r.pick("webscale_planner-cpu2", part=heap, tree="base tree")["bytes_per_record"]
    return (
        f"streaming planner **{a['startup_s'] * 1e3:.0f} / {b['startup_s'] * 1e3:.0f} ms, {a['peak_mib']:.2f} / "
        f"{b['peak_mib']:.2f} MiB**; ArrayRecord source {ours:.2f} bytes of Python heap a record at 1M (was "
        f"{base:.0f}); each process resumes its own position"
    )


def _writes(r: Results) -> str:
    v = r.key("index_writes-cpu2", "verdict")
    return (
        f"**{v['add_p50_ms']:.2f} ms**, {v['add_bytes'] / 1e3:.1f} KB to disk (a whole "
        f"{v['whole_version_bytes'] / 1e9:.1f} GB version per write before the log); search with a 10k delta "
        f"{v['search_p50_over_compacted']:.2f}x the compacted p50"
    )


ROWS = (
    Row("[shapes default](docs/training.md): test t→i R@1 / R@5", _shapes, ("shapes_default-cpu2",),
        "python -m bench.demo_run"),
    Row("[Flickr8k LiT](docs/pretrained.md) default (frozen EfficientNet-Lite2 + MPNet, trained heads; `make mpnet` "
        "first, 404 MB): dev t→i / i→t R@1", _lit, ("lit_default-cpu2", "lit_ablation-cpu2"),
        "python -m bench.lit_ablation --variants base --name lit_default --workdir /tmp/lit_default"),
    Row("[composed queries](docs/composed.md) on shapes edits: test R@1, composer vs reference image alone",
        _composed, ("composed-cpu2",), "python -m bench.composed --base runs/demo/shapes_tiny"),
    Row("[train step vs PyTorch](docs/benchmarks.md), same model and batch", _train_step,
        ("train_throughput-cpu2",), "python -m bench.train_throughput"),
    Row("[search at 1M x 256](docs/benchmarks.md): ScaNN recall@10, single-query p50", _search, ("search_1m-cpu2",),
        "python -m bench.search_latency --sizes 1e6 --dims 256 --methods numpy,scann,hnsw --blocks 5 --no-sweep "
        "--name search_1m"),
    Row("[serving](docs/serving.md) `POST /api/search`", _serving,
        ("serve_load-cpu2", "serve_load_text_towers-cpu2"),
        "python -m bench.serve_load --workdir runs/demo/shapes_tiny --size 1e6; python -m bench.serve_load --workdir "
        "RUN_MINILM --workdir RUN_MPNET --size 100000"),
    Row("[batch kNN on the mesh](docs/indexes.md) (`jaxmr index knn`) at 1M x 256, k = 100", _knn,
        ("knn_throughput-cpu2",), "python -m bench.knn_throughput --queries 4096"),
    Row("[web-scale shards](docs/data.md): jaxmr over webdataset tars vs webdataset + torch `DataLoader`, 224 px "
        "crops", _shards, ("input_pipeline_shards-cpu2", "shard_training-cpu2"),
        "python -m bench.input_pipeline --shards-only; python -m bench.shard_training"),
    Row("[web-scale start-up](docs/data.md#laion--datacomp-40000-shards-32-hosts) per process of 32 at 40k / 100k "
        "shards, 400M samples (simulated)", _webscale, ("webscale_planner-cpu2",),
        "python -m bench.webscale_planner --processes 32 --base-tree WORKTREE_OF_472611d"),
    Row("[index writes](docs/indexes.md) at 1M x 256: one add (vector given), acknowledged and durable", _writes,
        ("index_writes-cpu2",), "python -m bench.index_writes"),
)  # fmt: skip


def render(results: Results | None = None, rows: tuple[Row, ...] = ROWS) -> tuple[str, list[str]]:
    """The markdown table, and one message per row whose figure could not be made from its records."""
    results = results or Results()
    lines = ["| what | figure | record |", "|---|---|---|"]
    problems = []
    for row in rows:
        try:
            figure = row.figure(results)
        except (MissingRecord, KeyError, TypeError, ValueError) as error:
            problems.append(f"{row.what}: {type(error).__name__}: {error}")
            figure = "**no record**"
        files = ", ".join(f"[{name}](bench/results/{name}.md)" for name in row.files)
        lines.append(f"| {row.what} | {figure} | {files}: `{row.command}` |")
    return "\n".join(lines), problems


def section(readme: str) -> str:
    """The text between the README's headline markers."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), readme, re.S)
    if match is None:
        raise MissingRecord(f"the README has no headline markers ({BEGIN} ... {END})")
    return match.group(1)


def check(readme: str, results: Results | None = None) -> list[str]:
    """What is wrong with the README's headline table: rows without records, rows that differ from them."""
    table, problems = render(results)
    try:
        written = section(readme).splitlines()
    except MissingRecord as error:
        return [*problems, str(error)]
    wanted = table.splitlines()
    for line in written:
        if line not in wanted:
            problems.append(f"README row not made from its records: {line[:160]}")
    for line in wanted:
        if line not in written:
            problems.append(f"row missing from the README (run --write): {line[:160]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the README's table")
    mode.add_argument("--check", action="store_true", help="fail when the README's table differs from the records")
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args()
    readme = Path(args.readme)
    if args.check:
        problems = check(readme.read_text())
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(f"{len(ROWS)} headline rows match their records")
        return 1 if problems else 0
    table, problems = render()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    if not args.write:
        print(table)
        return 0
    text = readme.read_text()
    section(text)  # the markers must be there
    readme.write_text(re.sub(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END),
                             lambda _: f"{BEGIN}\n{table}\n{END}", text, flags=re.S))  # fmt: skip
    print(f"wrote {len(ROWS)} rows into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
