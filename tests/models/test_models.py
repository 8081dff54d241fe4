import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmr import losses
from jaxmr.data import caption_table, parse_source
from jaxmr.metrics import retrieval_metrics
from jaxmr.models import (
    PRESETS,
    ComposedQuery,
    ConvConfig,
    DualEncoder,
    ModelConfig,
    TextConfig,
    ViTConfig,
    parameter_counts,
)
from jaxmr.models.towers import sincos_2d
from jaxmr.sharding import make_mesh, param_shardings
from jaxmr.text import train_bpe

from conftest import assert_close_in_norm

SMALL = ModelConfig(
    image=ViTConfig(image_size=32, patch=8, width=64, depth=2, heads=2, pool="mean"),
    text=TextConfig(vocab_size=300, max_len=48, width=64, depth=2, heads=2),
    embed_dim=32,
)


# Eager NNX dispatches op by op (slow on CPU); the tests jit their forward and backward passes.
encode_image = nnx.jit(lambda model, images: model.encode_image(images))
encode_text = nnx.jit(lambda model, tokens: model.encode_text(tokens))
forward = nnx.jit(lambda model, images, tokens: model(images, tokens))


def _inputs(n=4, size=32, length=48, vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(4, vocab, (n, length)).astype(np.int32)
    tokens[:, 0], tokens[:, -10:] = 2, 0
    tokens[:, -11] = 3
    return jnp.asarray(images), jnp.asarray(tokens)


def test_presets_match_clip_parameter_counts():
    # OpenAI CLIP ViT-B/16: 149,620,737 parameters; ViT-L/14: 427,616,513. Ours add one: the sigmoid bias.
    assert parameter_counts(PRESETS["b16"])["total"] == 149_620_737 + 1
    assert parameter_counts(PRESETS["l14"])["total"] == 427_616_513 + 1
    tiny = parameter_counts(PRESETS["tiny"])
    assert tiny["image"] + tiny["text"] + 2 == tiny["total"]


def test_outputs_are_normalised_and_encoders_agree():
    model = DualEncoder(SMALL, rngs=nnx.Rngs(0))
    images, tokens = _inputs()
    zimg, ztxt, extras = forward(model, images, tokens)
    assert zimg.shape == ztxt.shape == (4, 32) and zimg.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(encode_image(model, images), zimg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encode_text(model, tokens), ztxt, rtol=1e-5, atol=1e-6)
    assert float(extras["t"]) == pytest.approx(10.0) and float(extras["b"]) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="ViT expects images"):
        model.encode_image(jnp.zeros((1, 16, 16, 3), jnp.uint8))


@pytest.mark.parametrize(("causal", "pool"), [(False, "eos"), (True, "eos"), (False, "mean"), (False, "cls")])
def test_padding_does_not_change_text_embeddings(causal, pool):
    config = dataclasses.replace(SMALL, text=dataclasses.replace(SMALL.text, causal=causal, pool=pool))
    model = DualEncoder(config, rngs=nnx.Rngs(1))
    _, tokens = _inputs()
    short = tokens[:, :40]  # the same sentences with 2 fewer padding tokens
    np.testing.assert_allclose(encode_text(model, tokens), encode_text(model, short), atol=2e-5)
    changed = tokens.at[:, 5].set(7)
    assert not np.allclose(encode_text(model, tokens), encode_text(model, changed), atol=1e-4)


@pytest.mark.parametrize("pool", ["cls", "map"])
def test_vit_pools_and_conv_tower(pool):
    config = dataclasses.replace(SMALL, image=dataclasses.replace(SMALL.image, pool=pool))
    images, _ = _inputs()
    assert encode_image(DualEncoder(config, rngs=nnx.Rngs(0)), images).shape == (4, 32)
    stem = dataclasses.replace(SMALL, image=dataclasses.replace(SMALL.image, pool=pool, stem="conv"))
    assert encode_image(DualEncoder(stem, rngs=nnx.Rngs(0)), images).shape == (4, 32)
    conv = dataclasses.replace(SMALL, image=ConvConfig(image_size=32, channels=(8, 16)))
    assert encode_image(DualEncoder(conv, rngs=nnx.Rngs(0)), images).shape == (4, 32)


def test_sincos2d_position_embedding():
    pe = np.asarray(sincos_2d(4, 16))  # 4 x 4 patches, 4 frequencies per quarter
    assert pe.shape == (16, 16)
    np.testing.assert_allclose(pe[0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4, atol=1e-7)  # row 0, column 0
    np.testing.assert_allclose(pe[1, :4], np.sin(1.0 / 10_000.0 ** (np.arange(4) / 3)), rtol=1e-6)  # column 1
    np.testing.assert_allclose(pe[4, 8:12], pe[1, :4], rtol=1e-6)  # row 1 reads like column 1, in its quarter
    assert len({tuple(row.round(5)) for row in pe}) == 16  # every patch has its own code
    image = dataclasses.replace(SMALL.image, posemb="sincos2d", pool="cls")
    model = DualEncoder(dataclasses.replace(SMALL, image=image), rngs=nnx.Rngs(0))
    assert not hasattr(model.image_tower, "pos_embed")  # nothing to learn
    images, _ = _inputs()
    swapped = np.array(images)  # the same 8 x 8 patches, two of them trading places
    swapped[:, :8, :8], swapped[:, :8, 8:16] = images[:, :8, 8:16], images[:, :8, :8]
    assert not np.allclose(encode_image(model, images), encode_image(model, swapped), atol=1e-3)
    with pytest.raises(ValueError, match="posemb"):
        ViTConfig(posemb="rope")


def _loss_and_grads(model, images, tokens):
    def loss_fn(model):
        zimg, ztxt, extras = model(images, tokens)
        return losses.softmax_loss(zimg, ztxt, extras["t"])[0]

    return nnx.value_and_grad(loss_fn)(model)


_loss_and_grads_jit = nnx.jit(_loss_and_grads)


def test_bf16_compute_keeps_float32_params_and_is_close():
    images, tokens = _inputs()
    fp32 = DualEncoder(SMALL, rngs=nnx.Rngs(0))
    bf16 = DualEncoder(dataclasses.replace(SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    z32, z16 = encode_image(fp32, images), encode_image(bf16, images)
    assert z16.dtype == jnp.float32 and float(jnp.max(jnp.abs(z32 - z16))) < 0.05
    loss, grads = _loss_and_grads_jit(bf16, images, tokens)
    assert loss.dtype == jnp.float32
    assert {v.dtype for v in jax.tree.leaves(grads)} == {jnp.dtype("float32")}


def test_remat_gives_the_same_gradients():
    images, tokens = _inputs()
    plain = DualEncoder(SMALL, rngs=nnx.Rngs(0))
    remat = DualEncoder(dataclasses.replace(SMALL, remat=True), rngs=nnx.Rngs(0))
    (l1, g1), (l2, g2) = _loss_and_grads_jit(plain, images, tokens), _loss_and_grads_jit(remat, images, tokens)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert_close_in_norm(g1, g2)  # recomputed activations may be fused differently: compare leaves in norm


def test_logical_axes_shard_params_and_sharded_forward_agrees():
    mesh = make_mesh([("data", 2), ("fsdp", 4)])
    model = DualEncoder(SMALL, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    shardings = param_shardings(state, mesh)
    mlp_kernel = shardings["image_tower"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert mlp_kernel.spec == jax.sharding.PartitionSpec("fsdp", None)  # ("embed", "mlp")
    assert shardings["log_t"].spec == jax.sharding.PartitionSpec()
    sharded_state = jax.device_put(state, shardings)
    images, tokens = _inputs(n=8)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    @jax.jit
    def forward(state, images, tokens):
        return nnx.merge(graph, state)(images, tokens)[:2]

    with jax.set_mesh(mesh):
        zimg, ztxt = forward(sharded_state, jax.device_put(images, batch), jax.device_put(tokens, batch))
    np.testing.assert_allclose(zimg, encode_image(model, images), atol=1e-5)
    np.testing.assert_allclose(ztxt, encode_text(model, tokens), atol=1e-5)


def test_composed_query_module():
    fusion = ComposedQuery(16, rngs=nnx.Rngs(0))
    zimg = jnp.eye(4, 16)
    ztxt = jnp.roll(jnp.eye(4, 16), 1, axis=1)
    out = fusion(zimg, ztxt)
    assert out.shape == (4, 16)
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    grads = nnx.grad(lambda f: losses.softmax_loss(f(zimg, ztxt), ztxt, 10.0)[0])(fusion)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="same shape"):
        fusion(zimg, ztxt[:, :8])


def _train(model, images, tokens, steps, lr=3e-3):
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = _loss_and_grads(model, images, tokens)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def test_tiny_model_learns_a_fixed_shapes_batch():
    """A few dozen steps on one batch of shapes: the loss falls far below log(B)."""
    source = parse_source("shapes:n=32,size=32")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=300, max_len=48)
    images = jnp.asarray(np.stack([source[i]["image"] for i in range(32)]))
    tokens = jnp.asarray(tokenizer.encode([source.captions(i)[0] for i in range(32)]))
    curve = _train(DualEncoder(SMALL, rngs=nnx.Rngs(0)), images, tokens, steps=80)
    assert curve[0] > 0.8 * math.log(32) and curve[-1] < 0.15 * math.log(32), curve[::10]


def test_obvious_matches_are_found():
    """Eight solid colours named in their captions: every caption finds its image and every image its caption."""
    colours = {
        "red": (220, 30, 30),
        "green": (30, 200, 30),
        "blue": (30, 30, 220),
        "yellow": (230, 220, 30),
        "purple": (150, 40, 200),
        "white": (245, 245, 245),
        "black": (5, 5, 5),
        "orange": (250, 140, 0),
    }
    images = jnp.asarray(np.stack([np.full((32, 32, 3), rgb, np.uint8) for rgb in colours.values()]))
    captions = [f"a plain {name} picture" for name in colours]
    tokenizer = train_bpe(captions, vocab_size=300, max_len=48)
    tokens = jnp.asarray(tokenizer.encode(captions))
    model = DualEncoder(SMALL, rngs=nnx.Rngs(0))
    _train(model, images, tokens, steps=30)
    metrics = retrieval_metrics(encode_image(model, images), encode_text(model, tokens), np.arange(8))
    assert metrics["t2i_r1"] == 1.0 and metrics["i2t_r1"] == 1.0


def test_projection_head_repeats_each_row_with_its_own_hidden_dropout():
    """LiT's image head on k captions per image: each image's features go in once and come out k times; without
    dropout the copies equal the single output, with it each copy has its own hidden dropout (so the k captions
    see k dropouts of the image's head)."""
    from jaxmr.models.dual_encoder import ProjectionHead

    head = ProjectionHead(8, 4, 16, dropout=0.5, rngs=nnx.Rngs(0))
    head.fc2.kernel[...] = jax.random.normal(jax.random.key(1), head.fc2.kernel.shape)  # zero-initialised
    x = jax.random.normal(jax.random.key(2), (3, 8))
    once = head(x)
    np.testing.assert_array_equal(head(x, repeat=5), jnp.repeat(once, 5, axis=0))
    dropped = np.asarray(head(x, jax.random.key(3), repeat=5)).reshape(3, 5, 4)
    assert all(len({tuple(np.round(c, 5)) for c in copies}) == 5 for copies in dropped)  # five different copies
    linear = np.asarray(head.linear(x))
    assert not np.allclose(dropped, linear[:, None]) and np.isfinite(dropped).all()
