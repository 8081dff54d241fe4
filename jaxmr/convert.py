"""Import CLIP and SigLIP checkpoints into jaxmr's ViT + text Transformer.

Formats read:
  - Hugging Face `CLIPModel` and `SiglipModel` folders (config.json + model.safetensors or pytorch_model.bin, and
    their tokenizer files);
  - OpenAI / OpenCLIP CLIP state dicts (`visual.transformer.resblocks.N...`, a `.pt` / `.bin` / `.safetensors`
    file), with the tokenizer taken from a Hugging Face CLIP folder (`tokenizer_dir`).

`import_model(src, out)` writes a model export (see `jaxmr.export`): `jaxmr index build --model OUT`, `jaxmr serve`
use it as they use a trained run, and `init_from=OUT` in a training config fine-tunes it.

Layout correspondences (torch Linear weights are [out, in]; ours are [in, out], attention kernels split into
heads): CLIP's class token, patch convolution without bias, pre-LayerNorm, pre-LN blocks with QuickGELU, the
post-LayerNorm on the class token, and bias-free projections; its text tower is causal and pools the EOS token
(the largest id). SigLIP's vision tower has a patch bias, no class token and no pre-LayerNorm, and pools with a
MAP head (probe attention + MLP); its text tower attends to the padding and pools the last position through a
linear head with a bias; the image embedding is the pooled output itself (an identity projection here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from jaxmr.config import DataConfig, LossConfig, TrainConfig
from jaxmr.export import write_export
from jaxmr.models import ModelConfig, TextConfig, ViTConfig, model_graph
from jaxmr.models.torch_io import ConversionError, TorchState, load_torch_checkpoint, merge_strict
from jaxmr.text import SentencePieceTokenizer, clip_bpe

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hf_blocks(t: TorchState, path: str, prefix: str, depth: int, heads: int) -> None:
    for i in range(depth):
        src, dst = f"{prefix}.layers.{i}", f"{path}/blocks/{i}"
        t.norm(f"{dst}/ln1", f"{src}.layer_norm1")
        t.norm(f"{dst}/ln2", f"{src}.layer_norm2")
        qkv = [(t.take(f"{src}.self_attn.{n}_proj.weight"), t.take(f"{src}.self_attn.{n}_proj.bias")) for n in "qkv"]
        t.attention(f"{dst}/attn", *qkv, out=f"{src}.self_attn.out_proj", heads=heads)
        t.linear(f"{dst}/mlp/fc1", f"{src}.mlp.fc1")
        t.linear(f"{dst}/mlp/fc2", f"{src}.mlp.fc2")


def _split_in_proj(t: TorchState, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    weight, bias = t.take(f"{key}.in_proj_weight"), t.take(f"{key}.in_proj_bias")
    return list(zip(np.split(weight, 3), np.split(bias, 3), strict=True))


def _logit_scale(t: TorchState, key: str) -> None:
    t.put("log_t", t.take(key).reshape(()))


# ------------------------------------------------------------------------------------------------- CLIP


def clip_from_hf(state: dict[str, np.ndarray], hf_config: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """A Hugging Face `CLIPModel` state dict and config.json -> (ModelConfig, params)."""
    v, x = hf_config["vision_config"], hf_config["text_config"]
    model = _clip_config(
        image_size=v["image_size"], patch=v["patch_size"], width=v["hidden_size"], depth=v["num_hidden_layers"],
        heads=v["num_attention_heads"], mlp=v["intermediate_size"], act=v.get("hidden_act", "quick_gelu"),
        eps=v.get("layer_norm_eps", 1e-5), vocab=x["vocab_size"], max_len=x["max_position_embeddings"],
        text_width=x["hidden_size"], text_depth=x["num_hidden_layers"], text_heads=x["num_attention_heads"],
        text_mlp=x["intermediate_size"], text_act=x.get("hidden_act", "quick_gelu"),
        embed_dim=hf_config.get("projection_dim", 512),
    )  # fmt: skip
    t = TorchState(state)
    vis, txt = "vision_model", "text_model"
    t.put("image_tower/patchify/kernel", t.take(f"{vis}.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0))
    t.put("image_tower/cls_token", t.take(f"{vis}.embeddings.class_embedding")[None, None])
    t.put("image_tower/pos_embed", t.take(f"{vis}.embeddings.position_embedding.weight")[None])
    t.norm("image_tower/ln_pre", f"{vis}.pre_layrnorm")
    _hf_blocks(t, "image_tower/encoder", f"{vis}.encoder", model.image.depth, model.image.heads)
    t.norm("image_tower/ln_post", f"{vis}.post_layernorm")
    t.linear("image_proj", "visual_projection", bias=False)
    t.put("text_tower/token_embed/embedding", t.take(f"{txt}.embeddings.token_embedding.weight"))
    t.put("text_tower/pos_embed", t.take(f"{txt}.embeddings.position_embedding.weight")[None])
    _hf_blocks(t, "text_tower/encoder", f"{txt}.encoder", model.text.depth, model.text.heads)
    t.norm("text_tower/ln_final", f"{txt}.final_layer_norm")
    t.linear("text_proj", "text_projection", bias=False)
    _logit_scale(t, "logit_scale")
    t.check_all_used(ignore=r".*position_ids")
    return model, _with_bias(t.params)


def clip_from_openai(state: dict[str, np.ndarray]) -> tuple[ModelConfig, dict]:
    """An OpenAI / OpenCLIP CLIP state dict (ViT image tower) -> (ModelConfig, params); sizes read off the shapes."""
    if "visual.conv1.weight" not in state:
        raise ConversionError("not an OpenAI/OpenCLIP ViT CLIP state dict (no visual.conv1.weight)")
    conv = np.shape(state["visual.conv1.weight"])
    width, patch = conv[0], conv[-1]
    grid = round((np.shape(state["visual.positional_embedding"])[0] - 1) ** 0.5)
    count = lambda prefix: len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    depth, text_depth = count("visual.transformer.resblocks."), count("transformer.resblocks.")
    text_width = np.shape(state["ln_final.weight"])[0]
    model = _clip_config(
        image_size=grid * patch, patch=patch, width=width, depth=depth, heads=width // 64,
        mlp=np.shape(state["visual.transformer.resblocks.0.mlp.c_fc.weight"])[0], act="quick_gelu", eps=1e-5,
        vocab=np.shape(state["token_embedding.weight"])[0], max_len=np.shape(state["positional_embedding"])[0],
        text_width=text_width, text_depth=text_depth, text_heads=text_width // 64,
        text_mlp=np.shape(state["transformer.resblocks.0.mlp.c_fc.weight"])[0], text_act="quick_gelu",
        embed_dim=np.shape(state["text_projection"])[1],
    )  # fmt: skip
    t = TorchState(state)
    t.put("image_tower/patchify/kernel", t.take("visual.conv1.weight").transpose(2, 3, 1, 0))
    t.put("image_tower/cls_token", t.take("visual.class_embedding")[None, None])
    t.put("image_tower/pos_embed", t.take("visual.positional_embedding")[None])
    t.norm("image_tower/ln_pre", "visual.ln_pre")
    _openai_blocks(t, "image_tower/encoder", "visual.transformer", depth, model.image.heads)
    t.norm("image_tower/ln_post", "visual.ln_post")
    t.put("image_proj/kernel", t.take("visual.proj"))  # x @ proj: already [in, out]
    t.put("text_tower/token_embed/embedding", t.take("token_embedding.weight"))
    t.put("text_tower/pos_embed", t.take("positional_embedding")[None])
    _openai_blocks(t, "text_tower/encoder", "transformer", text_depth, model.text.heads)
    t.norm("text_tower/ln_final", "ln_final")
    t.put("text_proj/kernel", t.take("text_projection"))
    _logit_scale(t, "logit_scale")
    t.check_all_used(ignore=r"(input_resolution|context_length|vocab_size|attn_mask|.*\.attn_mask)")
    return model, _with_bias(t.params)


def _openai_blocks(t: TorchState, path: str, prefix: str, depth: int, heads: int) -> None:
    for i in range(depth):
        src, dst = f"{prefix}.resblocks.{i}", f"{path}/blocks/{i}"
        t.norm(f"{dst}/ln1", f"{src}.ln_1")
        t.norm(f"{dst}/ln2", f"{src}.ln_2")
        t.attention(f"{dst}/attn", *_split_in_proj(t, f"{src}.attn"), out=f"{src}.attn.out_proj", heads=heads)
        t.linear(f"{dst}/mlp/fc1", f"{src}.mlp.c_fc")
        t.linear(f"{dst}/mlp/fc2", f"{src}.mlp.c_proj")


def _clip_config(*, image_size, patch, width, depth, heads, mlp, act, eps, vocab, max_len, text_width, text_depth,
                 text_heads, text_mlp, text_act, embed_dim) -> ModelConfig:  # fmt: skip
    return ModelConfig(
        image=ViTConfig(image_size=image_size, patch=patch, width=width, depth=depth, heads=heads,
                        mlp_ratio=mlp / width, pool="cls", activation=_activation(act), ln_eps=eps),
        text=TextConfig(vocab_size=vocab, max_len=max_len, width=text_width, depth=text_depth, heads=text_heads,
                        mlp_ratio=text_mlp / text_width, causal=True, pool="argmax", mask_padding=False,
                        activation=_activation(text_act), ln_eps=eps),
        embed_dim=embed_dim, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD, init_logit_scale=1 / 0.07,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- SigLIP


def siglip_from_hf(state: dict[str, np.ndarray], hf_config: dict[str, Any]) -> tuple[ModelConfig, dict]:
    """A Hugging Face `SiglipModel` state dict and config.json -> (ModelConfig, params)."""
    v, x = hf_config["vision_config"], hf_config["text_config"]
    width, text_width = v["hidden_size"], x["hidden_size"]
    embed_dim = x.get("projection_size") or text_width
    if embed_dim != width:
        raise ConversionError(f"SigLIP's image embedding is its {width}-d pooled output, the text head gives "
                              f"{embed_dim}: they must match")  # fmt: skip
    eps = v.get("layer_norm_eps", 1e-6)
    model = ModelConfig(
        image=ViTConfig(image_size=v["image_size"], patch=v["patch_size"], width=width, depth=v["num_hidden_layers"],
                        heads=v["num_attention_heads"], mlp_ratio=v["intermediate_size"] / width, pool="map",
                        activation=_activation(v.get("hidden_act", "gelu_pytorch_tanh")), ln_pre=False, ln_eps=eps,
                        patch_bias=True),
        text=TextConfig(vocab_size=x["vocab_size"], max_len=x["max_position_embeddings"], width=text_width,
                        depth=x["num_hidden_layers"], heads=x["num_attention_heads"],
                        mlp_ratio=x["intermediate_size"] / text_width, causal=False, pool="last", mask_padding=False,
                        pad_id=1, activation=_activation(x.get("hidden_act", "gelu_pytorch_tanh")),
                        ln_eps=x.get("layer_norm_eps", 1e-6)),
        embed_dim=embed_dim, proj_bias=True, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5),
        init_logit_scale=10.0, init_logit_bias=-10.0,
    )  # fmt: skip
    t = TorchState(state)
    vis, txt = "vision_model", "text_model"
    t.put("image_tower/patchify/kernel", t.take(f"{vis}.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0))
    t.put("image_tower/patchify/bias", t.take(f"{vis}.embeddings.patch_embedding.bias"))
    t.put("image_tower/pos_embed", t.take(f"{vis}.embeddings.position_embedding.weight")[None])
    _hf_blocks(t, "image_tower/encoder", f"{vis}.encoder", model.image.depth, model.image.heads)
    t.norm("image_tower/ln_post", f"{vis}.post_layernorm")
    head = f"{vis}.head"
    t.put("image_tower/map_head/probe", t.take(f"{head}.probe"))
    t.attention("image_tower/map_head/attn", *_split_in_proj(t, f"{head}.attention"), out=f"{head}.attention.out_proj",
                heads=model.image.heads)  # fmt: skip
    t.norm("image_tower/map_head/ln", f"{head}.layernorm")
    t.linear("image_tower/map_head/mlp/fc1", f"{head}.mlp.fc1")
    t.linear("image_tower/map_head/mlp/fc2", f"{head}.mlp.fc2")
    t.put("image_proj/kernel", np.eye(width, dtype=np.float32))  # x @ I == x exactly
    t.put("image_proj/bias", np.zeros(width, np.float32))
    t.put("text_tower/token_embed/embedding", t.take(f"{txt}.embeddings.token_embedding.weight"))
    t.put("text_tower/pos_embed", t.take(f"{txt}.embeddings.position_embedding.weight")[None])
    _hf_blocks(t, "text_tower/encoder", f"{txt}.encoder", model.text.depth, model.text.heads)
    t.norm("text_tower/ln_final", f"{txt}.final_layer_norm")
    t.linear("text_proj", f"{txt}.head")
    _logit_scale(t, "logit_scale")
    t.put("b", t.take("logit_bias").reshape(()))
    t.check_all_used(ignore=r".*position_ids")
    return model, t.params


def _with_bias(params: dict) -> dict:
    """CLIP has no sigmoid bias; the DualEncoder keeps one (unused by the softmax loss): its initial value."""
    return {**params, "b": np.asarray(-10.0, np.float32)}


def _activation(name: str) -> str:
    table = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
    if name not in table:
        raise ConversionError(f"unsupported activation {name!r}")
    return table[name]


# ------------------------------------------------------------------------------------------- file formats


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file or a torch checkpoint (zip or legacy; read without torch)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)

    state = load_torch_checkpoint(path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _hf_weights(folder: Path) -> dict[str, np.ndarray]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return read_state_dict(folder / name)
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin")


def convert(src: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None):
    """(TrainConfig, params, tokenizer) for a CLIP / SigLIP checkpoint (a Hugging Face folder or an OpenAI file)."""

    src = Path(src)
    if src.is_dir():
        if not (src / "config.json").exists():
            raise ConversionError(f"{src}: a Hugging Face model folder needs config.json")
        hf_config = json.loads((src / "config.json").read_text())
        kind = hf_config.get("model_type")
        state = _hf_weights(src)
        if kind == "clip":
            model, params = clip_from_hf(state, hf_config)
            tokenizer = clip_bpe(tokenizer_dir or src, model.text.max_len)
        elif kind == "siglip":
            model, params = siglip_from_hf(state, hf_config)
            spm = Path(tokenizer_dir or src) / SentencePieceTokenizer.MODEL_FILE
            if not spm.exists():
                raise ConversionError(f"no SigLIP tokenizer: {spm} is missing")
            tokenizer = SentencePieceTokenizer(spm.read_bytes(), model.text.max_len)
        else:
            raise ConversionError(f"{src}: model_type {kind!r}; this converter reads clip and siglip")
    elif src.is_file():
        if tokenizer_dir is None:
            raise ConversionError("an OpenAI/OpenCLIP state dict carries no tokenizer: pass a Hugging Face CLIP "
                                  "tokenizer folder (vocab.json + merges.txt or tokenizer.json)")  # fmt: skip
        model, params = clip_from_openai(read_state_dict(src))
        tokenizer = clip_bpe(tokenizer_dir, model.text.max_len)
    else:
        raise FileNotFoundError(f"{src} does not exist")
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens, the text tower embeds "
                              f"{model.text.vocab_size}: they do not belong together")  # fmt: skip
    config = TrainConfig(
        model=model,
        data=DataConfig(
            image_size=model.image.image_size,
            tokenizer=tokenizer.kind,
            max_len=model.text.max_len,
            vocab_size=model.text.vocab_size,
        ),
        # fine-tuning continues with the loss the model was trained with
        loss=LossConfig(name="sigmoid" if tokenizer.kind == "sentencepiece" else "softmax"),
    )
    return config, params, tokenizer


def import_model(src: str | os.PathLike, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Converts `src` and writes a model export to `out`; returns the export's fingerprint."""

    config, params, tokenizer = convert(src, tokenizer_dir)
    _, abstract, _ = model_graph(config.model)
    params = merge_strict(abstract, params, str(src))  # every parameter of the model, with its shape
    return write_export(out, config, params, tokenizer, step=0, origin=str(Path(src).resolve()))
