"""The evaluator protocol: toy embedders whose right answer is obvious, the same numbers from the trainer's
embedder and the serving encoder, and evaluators named in a config logged during training."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxmr.config import load_config_file
from jaxmr.data import parse_source
from jaxmr.evaluators import ClassPrecision, Composed, EncoderEmbedder, Retrieval, parse_evaluator
from jaxmr.training.checkpoints import read_metrics
from jaxmr.training.evaluators import TrainEmbedder
from jaxmr.training.loop import train
from jaxmr.training.runs import load_run, run_encoder

from conftest import ROOT, SMOKE_SOURCE


class Oracle:
    """Embeds every image of a source as its one-hot vector and every caption as the normalised sum of the one-hot
    vectors of the images it describes (the shapes world repeats some captions): a perfect model, up to ties,
    which recall does not count against. `broken` images are unreadable."""

    def __init__(self, source, broken=()):
        self.source, self.broken = source, set(broken)
        self.owners = {}
        for i in range(len(source)):
            for caption in source.captions(i):
                self.owners.setdefault(caption, set()).add(i)

    def embed_images(self, images, progress=False):
        z = np.eye(len(images), dtype=np.float32)
        valid = np.array([i not in self.broken for i in range(len(images))])
        return z * valid[:, None], valid

    def embed_texts(self, texts, progress=False):
        z = np.zeros((len(texts), len(self.source)), np.float32)
        for row, text in enumerate(texts):
            z[row, sorted(self.owners[text])] = 1.0
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def compose(self, zref, texts):
        return None


def test_retrieval_of_a_perfect_model_and_unreadable_images():
    source = parse_source(SMOKE_SOURCE, "test")
    metrics = Retrieval(source)(Oracle(source))
    assert metrics["t2i_r1"] == 1.0 and metrics["i2t_r1"] == 1.0 and metrics["unreadable_images"] == 0
    broken = Retrieval(source)(Oracle(source, broken=[3, 5]))
    assert broken["unreadable_images"] == 2 and broken["n_images"] == len(source) - 2
    assert broken["n_captions"] == metrics["n_captions"] - len(source.captions(3)) - len(source.captions(5))


def test_class_precision_of_a_model_that_sees_only_class_names():
    """An embedder that maps each image to its classes' mean one-hot and each prompt to its class name's one-hot
    retrieves only images showing the class: precision@10 is 1 for every class with 10 images."""
    source = parse_source(SMOKE_SOURCE, "test")
    classes = list(source.classes)

    class Labels:
        def embed_images(self, images, progress=False):
            z = np.zeros((len(images), len(classes)), np.float32)
            for i in range(len(images)):
                z[i, source.labels(i)] = 1.0
            return z / np.linalg.norm(z, axis=1, keepdims=True), np.ones(len(images), bool)

        def embed_texts(self, texts, progress=False):  # the template "{}": each prompt is a class name
            return np.eye(len(classes), dtype=np.float32)[[classes.index(t) for t in texts]]

        def compose(self, zref, texts):
            return None

    evaluator = ClassPrecision(source, templates=("{}",))
    report = evaluator.report(Labels())
    counts = [row["images"] for row in report["per_class"]]
    assert all(row["p@10"] == 1.0 for row, n in zip(report["per_class"], counts, strict=True) if n >= 10)
    assert evaluator(Labels())["mean_p@10"] == pytest.approx(report["mean_p@10"])


def test_parse_evaluator_names_and_errors():
    assert isinstance(parse_evaluator("retrieval", SMOKE_SOURCE, "val"), Retrieval)
    assert isinstance(parse_evaluator(f"classes@{SMOKE_SOURCE}", "captions:/nowhere", "val"), ClassPrecision)
    assert isinstance(parse_evaluator("composed@shapes-edits:n=64,size=32", SMOKE_SOURCE, "val"), Composed)
    with pytest.raises(ValueError, match="unknown evaluator 'recal'"):
        parse_evaluator("recal", SMOKE_SOURCE, "val")


def test_trainer_and_serving_encoder_embed_alike(smoke_run):
    """The same evaluator on the same checkpoint: the trainer's sharded embedder and the serving Encoder give the
    same embeddings (float32, other batch shapes: within 1e-5) and so the same recall."""
    _, trainable, state, tokenizer = load_run(smoke_run)
    source = parse_source(SMOKE_SOURCE, "test")
    texts = [source.captions(i)[0] for i in range(len(source))]
    with jax.set_mesh(trainable.mesh):
        trained = TrainEmbedder(trainable, tokenizer, state.params)
        zimg_t, valid_t = trained.embed_images(source)
        ztxt_t = trained.embed_texts(texts)
    served = EncoderEmbedder(run_encoder(smoke_run))
    zimg_s, valid_s = served.embed_images(source)
    assert valid_t.all() and valid_s.all()
    np.testing.assert_allclose(zimg_t, zimg_s, atol=1e-5)
    np.testing.assert_allclose(ztxt_t, served.embed_texts(texts), atol=1e-5)


def test_configured_evaluators_are_logged_during_training(tmp_path):
    config = load_config_file(str(ROOT / "configs" / "shapes_tiny.py:smoke"))
    config = dataclasses.replace(config, steps=3, evaluators=("retrieval", f"classes@{SMOKE_SOURCE}"),
                                 best_metric="classes/mean_p@10")  # fmt: skip
    last = train(config, tmp_path / "run", progress=False)
    assert {"t2i_r1", "classes/mean_p@10", "classes/zero_shot_top1"} <= set(last)
    logged = [m for m in read_metrics(tmp_path / "run") if "eval/classes/mean_p@10" in m]
    assert logged and logged[-1]["step"] == 3
