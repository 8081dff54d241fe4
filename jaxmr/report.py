"""Evaluation a person can look at: class-name precision@K, zero-shot accuracy, precision-recall curves, a
t-SNE map and result grids, written as one report.

    jaxmr eval --workdir runs/shapes_tiny --split test --report docs/report_shapes
    jaxmr eval --workdir runs/flickr8k_lit --labelled labelled:~/imagenette/val --json

A captioned split gives recall@K (the training metric) and the micro-averaged precision-recall curve of
text->image over every caption-image pair. A class-labelled set (`labelled:DIR`, a TFDS classification set,
or the shapes world, whose images are labelled with the shapes they show) gives, per class, the precision@10
and @100 of the class name as a text query (prompt-ensembled: "a photo of a {}.", ...), and zero-shot
classification: top-1 / top-5 accuracy and the per-class precision and recall of the top-1 prediction.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxmr.data import caption_table, parse_source
from jaxmr.data.records import Source, has_labels
from jaxmr.evaluators import KS, ClassPrecision, EncoderEmbedder, embed_images
from jaxmr.metrics import (
    class_embeddings,
    label_matrix,
    precision_recall_curve,
    retrieval_metrics,
)
from jaxmr.training.runs import load_encoder
from jaxmr.viz import result_grid

log = logging.getLogger(__name__)

DIRECTIONS = (("t2i", "text -> image"), ("i2t", "image -> text"))


def class_table(report: dict[str, Any], ks=KS) -> str:
    """The per-class table (markdown), with the means in the last row."""
    columns = ["class", "images", *(f"p@{k}" for k in ks), "zero_shot_precision", "zero_shot_recall"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["per_class"]:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    means = ["**mean**", str(report["n_images"]), *(f"**{report[f'mean_p@{k}']:.3f}**" for k in ks), "", ""]
    lines.append("| " + " | ".join(means) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.3f}"
    return str(value)


# ------------------------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib  # plotting is for reports only; matplotlib costs ~0.5 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (see above)

    return plt


def plot_pr_curve(curve: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.plot(curve["recall"], curve["precision"], lw=1.5)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{title}\naverage precision {curve['average_precision']:.3f}")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_tsne(zimg: np.ndarray, colour: np.ndarray, names: list[str], path: Path, title: str, seed: int = 0) -> None:
    """t-SNE of up to 2,000 image embeddings, coloured by `colour` (int [N], an index into `names`)."""
    from sklearn.manifold import TSNE  # scikit-learn costs ~1 s to import; only the t-SNE views need it

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(zimg), min(2000, len(zimg)), replace=False))
    xy = TSNE(2, init="pca", perplexity=min(30, max(2, len(rows) // 4)), random_state=seed).fit_transform(zimg[rows])
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        mask = colour[rows] == c
        ax.scatter(xy[mask, 0], xy[mask, 1], s=5, color=cmap(c % cmap.N), label=name)
    ax.set(xticks=[], yticks=[], title=title)
    ax.legend(fontsize=7, markerscale=2.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def top_grid(source: Source, scores: np.ndarray, relevant: np.ndarray, path: Path, title: str, k: int = 10) -> None:
    """The k best-scoring images of `source` as a result grid, framed green where `relevant`."""

    top = np.argsort(-scores, kind="stable")[:k]
    labels = [f"#{rank + 1} {scores[i]:.3f}" for rank, i in enumerate(top)]
    result_grid([source[int(i)]["image"] for i in top], labels, path, title, [bool(relevant[i]) for i in top])


def _clusters(z: np.ndarray, k: int = 8, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans  # scikit-learn costs ~1 s to import; only the report's clusters need it

    return KMeans(min(k, len(z)), n_init=3, random_state=seed).fit_predict(z)


def _downsample(curve: dict[str, Any], points: int = 400) -> list[dict[str, float]]:
    """At most `points` points of the curve, evenly spaced in recall (for the CSV a person opens)."""
    recall = curve["recall"]
    keep = np.unique(np.searchsorted(recall, np.linspace(0, 1, points), side="left").clip(0, len(recall) - 1))
    return [{"recall": float(recall[i]), "precision": float(curve["precision"][i]),
             "threshold": float(curve["threshold"][i])} for i in keep]  # fmt: skip


# ------------------------------------------------------------------------------------------- the report


def write_report(workdir: str | Path, out: str | Path, source_spec: str | None = None, split: str | None = None,
                 labelled_spec: str | None = None, templates=None, n_queries: int = 3,
                 progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Writes report.md, report.html, metrics.json, pr_curve.csv and the PNGs under `out`; returns the metrics.

    The captioned part uses the run's data (or `source_spec`) on `split` (default: the run's eval split); the
    class part uses `labelled_spec`, or that same source when it has class labels (the shapes world does)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(workdir)
    config = encoder.config
    split = split or config.data.eval_split
    source = parse_source(source_spec or config.data.source, split)
    zimg, _ = embed_images(encoder, source, progress=progress, strict=True)
    texts, caption_to_image = caption_table(source)
    metrics: dict[str, Any] = {"model": str(workdir), "source": source.name, "split": split}
    md = [f"# Evaluation report: {Path(workdir).name}", "", f"Model `{workdir}` on `{source.name}`, split `{split}`: "
          f"{len(source):,} images, {len(texts):,} captions."]  # fmt: skip
    figures: list[tuple[str, str]] = []
    rng = np.random.default_rng(0)
    if texts:
        ztxt = encoder.encode_texts(texts)
        recall = retrieval_metrics(zimg, ztxt, caption_to_image)
        similarity = ztxt @ zimg.T
        relevant = caption_to_image[:, None] == np.arange(len(zimg))[None, :]
        curve = precision_recall_curve(similarity, relevant)
        metrics["recall"], metrics["caption_average_precision"] = recall, curve["average_precision"]
        (out / "pr_curve.csv").write_text("recall,precision,threshold\n" + "".join(
            f"{p['recall']:.5f},{p['precision']:.5f},{p['threshold']:.5f}\n" for p in _downsample(curve)))  # fmt: skip
        plot_pr_curve(curve, out / "pr_curve.png", "text -> image, every caption-image pair")
        md += ["", "## Caption retrieval", "",
               "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|",
               *(f"| {name} | {recall[f'{d}_r1']:.3f} | {recall[f'{d}_r5']:.3f} | {recall[f'{d}_r10']:.3f} | "
                 f"{recall[f'{d}_median_rank']:.0f} |" for d, name in DIRECTIONS),
               "", f"Precision-recall over all {similarity.size:,} caption-image pairs (micro-averaged): average "
               f"precision **{curve['average_precision']:.3f}**; data in `pr_curve.csv`.", "",
               "![precision-recall curve](pr_curve.png)"]  # fmt: skip
        for q, c in enumerate(np.sort(rng.choice(len(texts), min(n_queries, len(texts)), replace=False))):
            name = f"grid_caption_{q}.png"
            top_grid(source, similarity[c], relevant[c], out / name, f'"{texts[c]}"')
            figures.append((name, f'"{texts[c]}" (green: the captioned image)'))
    labelled = parse_source(labelled_spec, split) if labelled_spec else source if has_labels(source) else None
    colour, names = None, []
    if labelled is not None:
        zlab = zimg if labelled is source else embed_images(encoder, labelled, progress=progress, strict=True)[0]
        classes = ClassPrecision(labelled, templates).report(EncoderEmbedder(encoder), zlab)
        metrics["classes"] = classes
        templates = classes["templates"]
        md += ["", f"## Classes: `{labelled.name}`", "",
               f"Class names as text queries, each the mean of {len(templates)} prompts "
               f"({', '.join(f'`{t}`' for t in templates)}). Precision@K: the fraction of a class query's top K "
               "images that show the class. Zero-shot: each image is given the class whose prompts are nearest; "
               f"**top-1 accuracy {classes['zero_shot_top1']:.3f}, top-5 {classes['zero_shot_top5']:.3f}** "
               "(an image showing several classes is right when any of them is predicted). Chance: precision "
               f"{classes['chance_precision']:.3f} (the share of images showing a class), top-1 "
               f"{classes['chance_top1']:.3f}.", "",
               class_table(classes)]  # fmt: skip
        if labelled is source:
            colour, names = np.array([source.labels(i)[0] for i in range(len(source))]), list(source.classes)
        zclass = class_embeddings(encoder.encode_texts, list(labelled.classes), tuple(templates))
        relevant = label_matrix([labelled.labels(i) for i in range(len(labelled))], len(labelled.classes))
        for c in rng.choice(len(labelled.classes), min(2, len(labelled.classes)), replace=False):
            name = f"grid_class_{labelled.classes[c]}.png"
            top_grid(labelled, zlab @ zclass[c], relevant[:, c], out / name, f"class: {labelled.classes[c]}")
            figures.append((name, f"class query “{labelled.classes[c]}” (green: shows the class)"))
    if colour is None:  # no classes to colour by: k-means clusters of the image embeddings
        colour = _clusters(zimg)
        names = [f"cluster {c}" for c in range(int(colour.max()) + 1)]
    plot_tsne(zimg, colour, names, out / "tsne.png", "image embeddings (t-SNE)")
    md += ["", "## Image embeddings", "", "t-SNE of the image embeddings, coloured by "
           + ("each image's first class." if names and not names[0].startswith("cluster") else "k-means cluster."),
           "", "![t-SNE](tsne.png)"]  # fmt: skip
    if figures:
        md += ["", "## Sample queries", ""] + [f"{caption}\n\n![{name}]({name})\n" for name, caption in figures]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html("\n".join(md)))
    return metrics


def _html(markdown: str) -> str:
    """The report's markdown as a plain HTML page (headings, tables, images, paragraphs)."""
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip().strip("*")) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")  # fmt: skip
    return f"<!doctype html><meta charset=utf-8><title>jaxmr report</title><style>{style}</style>\n" + "\n".join(body)
