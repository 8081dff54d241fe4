"""CLIP and SigLIP import: small random-initialised `transformers` models (no download) converted into jaxmr's
DualEncoder give the same image and text embeddings, and their tokenizers the same ids."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmr.convert import ConversionError, convert, import_model
from jaxmr.models import DualEncoder
from jaxmr.models.torch_io import merge_strict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, TEXT_LEN = 64, 16
CLIP_VOCAB = 600  # holds the tiny CLIP BPE vocabulary below (518 tokens)


def _features(output):
    """transformers returns a tensor or (newer versions) a model output holding the pooled features."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).detach().numpy()


def _ours(config, params):
    model = nnx.eval_shape(lambda: DualEncoder(config.model, rngs=nnx.Rngs(0)))
    nnx.update(model, merge_strict(nnx.to_pure_dict(nnx.state(model)), params, "converted"))
    return model


def _tokens(rng, n, pad_id, eos_id, vocab=VOCAB):
    """Random token rows ending in EOS at varying lengths, padded after it."""
    tokens = np.full((n, TEXT_LEN), pad_id, np.int64)
    for row, length in enumerate(rng.integers(3, TEXT_LEN, n)):
        tokens[row, :length] = rng.integers(3, vocab - 2, length)
        tokens[row, length] = eos_id
    return tokens


def _compare(ours, reference, images, tokens):
    zimg = np.asarray(ours.project_image(ours.image_tower(jax.numpy.asarray(images.transpose(0, 2, 3, 1)))))
    ztxt = np.asarray(ours.project_text(ours.text_tower(jax.numpy.asarray(tokens.astype(np.int32)))))
    with torch.no_grad():
        ref_img = _features(reference.get_image_features(pixel_values=torch.from_numpy(images)))
        ref_txt = _features(reference.get_text_features(input_ids=torch.from_numpy(tokens)))
    assert zimg.shape == ref_img.shape and ztxt.shape == ref_txt.shape
    assert np.abs(zimg - ref_img).max() <= 1e-4
    assert np.abs(ztxt - ref_txt).max() <= 1e-4


def _clip_reference(width=32, heads=2):
    text = dict(vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=heads, max_position_embeddings=TEXT_LEN, bos_token_id=CLIP_VOCAB - 2,
                eos_token_id=CLIP_VOCAB - 1, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=heads,
                  image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    return transformers.CLIPModel(config).eval()


def _save_hf(model, folder):
    model.save_pretrained(folder)
    return folder


def _clip_tokenizer_files(folder):
    """A tiny CLIP BPE vocabulary in the Hugging Face file layout."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())  # the 256 byte symbols of byte-level BPE
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_hf_clip_converts_with_identical_embeddings_and_tokens(tmp_path):
    reference = _clip_reference()
    folder = _save_hf(reference, tmp_path / "clip")
    hf_tokenizer = _clip_tokenizer_files(folder)
    config, params, tokenizer = convert(folder)
    assert config.model.text.causal and config.model.image.pool == "cls"
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    _compare(_ours(config, params), reference, images, _tokens(rng, 4, 0, CLIP_VOCAB - 1, CLIP_VOCAB))

    texts = ["a cat", "A dog and a cat!", "dogs"]
    ours = tokenizer.encode(texts)
    theirs = hf_tokenizer(texts)["input_ids"]
    for row, ids in zip(ours, theirs, strict=True):
        assert list(row[: len(ids)]) == ids and (row[len(ids) :] == 0).all()
    assert ours.shape == (3, TEXT_LEN)


def test_openai_clip_state_dict_converts_like_the_hf_model(tmp_path):
    # No OpenAI/OpenCLIP model can be built offline here: its state dict is written from the HF reference with
    # the documented key correspondence (in_proj = concat(q, k, v); proj = projection weight transposed), and
    # saved with torch.save, which our reader loads without torch.
    reference = _clip_reference(width=128, heads=2)  # OpenAI towers use 64-d heads
    hf = {k: v.detach() for k, v in reference.state_dict().items()}
    state = {"logit_scale": hf["logit_scale"]}
    for tower, src in (("visual.", "vision_model."), ("", "text_model.")):
        for i in range(2):
            a, b = f"{src}encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
            for n in ("weight", "bias"):
                state[f"{b}attn.in_proj_{n}"] = torch.cat([hf[f"{a}self_attn.{p}_proj.{n}"] for p in "qkv"])
                state[f"{b}attn.out_proj.{n}"] = hf[f"{a}self_attn.out_proj.{n}"]
                for x, y in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
                    state[f"{b}{x}.{n}"] = hf[f"{a}{y}.{n}"]
    state["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    state["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    state["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    state["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    state["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    for x, y in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):  # fmt: skip
        for n in ("weight", "bias"):
            state[f"{x}.{n}"] = hf[f"{y}.{n}"]
    state["visual.proj"] = hf["visual_projection.weight"].T.contiguous()
    state["text_projection"] = hf["text_projection.weight"].T.contiguous()
    torch.save(state, tmp_path / "ViT-tiny.pt")
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    _clip_tokenizer_files(tokenizer_dir)

    with pytest.raises(ConversionError, match="carries no tokenizer"):
        convert(tmp_path / "ViT-tiny.pt")
    config, params, _ = convert(tmp_path / "ViT-tiny.pt", tokenizer_dir)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    _compare(_ours(config, params), reference, images, _tokens(rng, 3, 0, CLIP_VOCAB - 1, CLIP_VOCAB))


def _spm(folder):
    import io

    import sentencepiece

    model = io.BytesIO()
    sentences = ["a photo of a cat", "two dogs run on the grass", "a red car parked in the street"] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(model.getvalue())


def test_hf_siglip_converts_with_identical_embeddings_and_tokens(tmp_path):
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=TEXT_LEN)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    folder = _save_hf(reference, tmp_path / "siglip")
    _spm(folder)
    config, params, tokenizer = convert(folder)
    assert config.loss.name == "sigmoid" and config.model.image.pool == "map"
    assert params["b"] == pytest.approx(float(reference.logit_bias.detach()))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    _compare(_ours(config, params), reference, images, _tokens(rng, 4, 1, 1))

    hf_tokenizer = transformers.SiglipTokenizer(str(folder / "spiece.model"), model_max_length=TEXT_LEN)
    texts = ["A photo of a cat.", "two  dogs, running!", "a red car " * 10]
    theirs = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_LEN)["input_ids"]
    np.testing.assert_array_equal(tokenizer.encode(texts), np.asarray(theirs))


def test_import_writes_an_export_that_serves_and_fine_tunes(tmp_path):
    from jaxmr.config import TrainConfig
    from jaxmr.encoder import Encoder
    from jaxmr.export import read_export_meta
    from jaxmr.sharding import make_mesh
    from jaxmr.training.step import build, init_state

    reference = _clip_reference()
    folder = _save_hf(reference, tmp_path / "clip")
    _clip_tokenizer_files(folder)
    out = tmp_path / "export"
    fingerprint = import_model(folder, out)
    assert read_export_meta(out)["fingerprint"] == fingerprint
    encoder = Encoder.load(out)
    z = encoder.encode_texts(["a cat", "a dog"])
    assert z.shape == (2, 24) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    assert encoder.encode_images(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 24)

    import dataclasses

    config = dataclasses.replace(read_config(out), init_from=str(out), batch_size=8, eval_batch_size=8)
    state = init_state(build(config, make_mesh(config.mesh)))
    np.testing.assert_array_equal(
        np.asarray(state.params["image_proj"]["kernel"]), reference.visual_projection.weight.detach().numpy().T
    )
    bad = dataclasses.replace(config, model=dataclasses.replace(config.model, embed_dim=16))
    with pytest.raises(ValueError, match="model config differs"):
        init_state(build(bad, make_mesh(bad.mesh)))
    assert isinstance(config, TrainConfig)


def read_config(export):
    from jaxmr.config import from_dict
    from jaxmr.export import read_export_meta

    return from_dict(read_export_meta(export)["config"])
