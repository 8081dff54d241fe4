"""Evaluation a person can look at: class precision@K, zero-shot, PR curves against hand-computed values;
labelled sources; the report and result grids end to end."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from jaxmr.cli import main
from jaxmr.data import DataError, parse_source
from jaxmr.metrics import class_embeddings, class_precision_at_k, label_matrix, precision_recall_curve, zero_shot

from conftest import SMOKE_SOURCE, write_image


def test_class_embeddings_average_the_normalised_prompts():
    vectors = {"a cat": [2, 0], "the cat": [0, 1], "a dog": [0, 3], "the dog": [0, 1]}
    z = class_embeddings(lambda texts: np.array([vectors[t] for t in texts], np.float32), ["cat", "dog"],
                         ("a {}", "the {}"))  # fmt: skip
    np.testing.assert_allclose(z, [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0, 1]], atol=1e-6)  # [1,0]+[0,1]; [0,1]x2
    assert class_embeddings(lambda t: np.ones((len(t), 2)), ["golden_retriever"], ("{}",)).shape == (1, 2)
    with pytest.raises(ValueError):
        class_embeddings(lambda t: t, [], ("{}",))


def test_class_precision_at_k_by_hand():
    # 2 classes x 5 images; class 0's ranking: images 4, 0, 2, 1, 3 of which 0 and 2 are relevant
    similarity = np.array([[0.8, 0.3, 0.5, 0.1, 0.9], [0.1, 0.2, 0.3, 0.4, 0.5]])
    relevant = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
    p = class_precision_at_k(similarity, relevant, ks=(1, 2, 3, 10))
    np.testing.assert_allclose(p["p@1"], [0, 1])  # class 0's best (image 4) is wrong; class 1's (4) right
    np.testing.assert_allclose(p["p@2"], [0.5, 1])
    np.testing.assert_allclose(p["p@3"], [2 / 3, 2 / 3])
    np.testing.assert_allclose(p["p@10"], [2 / 5, 2 / 5])  # K above N: out of the N images there are


def test_zero_shot_by_hand():
    # 4 images x 3 classes; image 3 shows classes 0 and 2 (multi-label)
    similarity = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.1, 0.9, 0.5], [0.1, 0.2, 0.7]])
    relevant = label_matrix([[0], [1], [1], [0, 2]], 3)
    out = zero_shot(similarity, relevant, ks=(1, 2))
    # top-1 predictions 0, 2, 1, 2: right, wrong, right, right (2 is one of image 3's classes)
    assert out["top1"] == 0.75
    assert out["top2"] == 1.0  # image 1's class 1 is its second best
    np.testing.assert_allclose(out["precision"], [1.0, 1.0, 0.5])  # class 2 predicted twice, right once
    np.testing.assert_allclose(out["recall"], [0.5, 0.5, 1.0])  # class 0: images 0 and 3, only 0 predicted 0
    never = zero_shot(np.array([[1.0, 0.0]]), label_matrix([[0]], 2))
    assert never["precision"][0] == 1 and np.isnan(never["precision"][1])


def test_precision_recall_curve_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    relevant = np.array([1, 0, 1, 0, 1], bool)
    curve = precision_recall_curve(scores, relevant)
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert curve["average_precision"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # ties count pessimistically: the irrelevant pair of a tie ranks first
    tied = precision_recall_curve(np.array([0.5, 0.5]), np.array([1, 0], bool))
    assert tied["average_precision"] == 0.5 and tied["precision"].tolist() == [0.5]
    with pytest.raises(ValueError, match="no relevant"):
        precision_recall_curve(scores, np.zeros(5, bool))


def test_labelled_folder_with_and_without_splits(tmp_path):
    for i, cls in enumerate(["cat", "dog", "golden_retriever"]):
        write_image(tmp_path / "flat" / cls / f"{i}.png", 30 * i)
        write_image(tmp_path / "flat" / cls / f"{i}b.jpg", 30 * i + 5)
    flat = parse_source(f"labelled:{tmp_path / 'flat'}", "test")
    assert flat.classes == ["cat", "dog", "golden_retriever"] and len(flat) == 6
    assert [flat.labels(i) for i in range(6)] == [[0], [0], [1], [1], [2], [2]]
    assert flat[0]["captions"] == [] and flat[0]["metadata"]["label"] == "cat"
    write_image(tmp_path / "split" / "train" / "cat" / "a.png", 1)
    write_image(tmp_path / "split" / "train" / "dog" / "b.png", 2)
    write_image(tmp_path / "split" / "validation" / "dog" / "c.png", 3)
    val = parse_source(f"labelled:{tmp_path / 'split'}", "val")
    assert val.classes == ["cat", "dog"] and len(val) == 1 and val.labels(0) == [1]  # numbered as in train
    with pytest.raises(DataError, match="no test folder"):
        parse_source(f"labelled:{tmp_path / 'split'}", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        parse_source(f"labelled:{tmp_path / 'empty'}")
    shapes = parse_source(SMOKE_SOURCE, "test")
    scene = shapes.scene(3)[0]
    assert [shapes.classes[c] for c in shapes.labels(3)] == sorted({o.shape for o in scene}, key=shapes.classes.index)
    assert parse_source(SMOKE_SOURCE, "all").classes == shapes.classes


def test_tfds_classification_set_has_classes():
    tfds = pytest.importorskip("tensorflow_datasets")

    class ToyClasses(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["tench", "english_springer", "church"]),
            }))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from ()

    with tfds.testing.mock_data(num_examples=5):
        source = parse_source("tfds:toy_classes", "train")
        assert source.classes == ["tench", "english_springer", "church"]
        assert all(0 <= source.labels(i)[0] < 3 for i in range(len(source)))


def test_report_and_class_metrics_end_to_end(smoke_run, tmp_path, capsys):
    out = tmp_path / "report"
    main(["eval", "--workdir", str(smoke_run), "--split", "test", "--report", str(out), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    for name in ("report.md", "report.html", "metrics.json", "pr_curve.csv", "pr_curve.png", "tsne.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("grid_caption_*.png"))) == 3 and len(list(out.glob("grid_class_*.png"))) == 2
    main(["eval", "--workdir", str(smoke_run), "--split", "test", "--json"])
    recall = json.loads(capsys.readouterr().out)
    assert metrics["recall"]["t2i_r1"] == pytest.approx(recall["t2i_r1"], abs=1e-6)  # same embeddings, same metric
    classes = metrics["classes"]
    assert classes["n_classes"] == 5 and len(classes["per_class"]) == 5
    # (top-5 of 5 classes is 1.0 whatever the model: it says nothing here; metrics.zero_shot's own test checks
    # top-k by hand.) Scenes hold several shapes, so an image can be right under more than one class.
    assert 0 <= classes["zero_shot_top1"] <= classes["zero_shot_top5"] <= 1
    assert sum(c["images"] for c in classes["per_class"]) >= classes["n_images"] == 64
    assert 0 <= classes["mean_p@10"] <= 1 and classes["templates"][0] == "a small red {}"
    assert "| circle |" in (out / "report.md").read_text() and "<table>" in (out / "report.html").read_text()
    rows = (out / "pr_curve.csv").read_text().splitlines()
    assert rows[0] == "recall,precision,threshold" and len(rows) > 10
    # the class metrics alone, with a prompt of one's own
    main(["eval", "--workdir", str(smoke_run), "--split", "test", "--labelled", SMOKE_SOURCE, "--prompt",
          "there is a {}", "--json"])  # fmt: skip
    alone = json.loads(capsys.readouterr().out)
    assert alone["templates"] == ["there is a {}"] and alone["n_images"] == 64
    assert main(["eval", "--workdir", str(smoke_run), "--labelled", SMOKE_SOURCE, "--prompt", "no placeholder"]) == 2
    assert "exactly one {}" in capsys.readouterr().err


def test_index_search_grid(smoke_run, tmp_path, capsys):
    from jaxmr.index.build import BuildOptions, build_index

    index = tmp_path / "index"
    build_index(smoke_run, SMOKE_SOURCE, index, split="test", options=BuildOptions(chunk=64), progress=False)
    grid = tmp_path / "grid.png"
    main(["index", "search", str(index), "a small red circle", "-k", "7", "--grid", str(grid)])
    assert "wrote" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.width == 5 * (112 + 8) and image.height == 18 + 2 * (112 + 8 + 14)  # 7 results: 2 rows of 5
