import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmr import losses
from jaxmr.sharding import make_mesh


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def batch():
    k1, k2 = jax.random.split(jax.random.key(0))
    zimg = _unit(jax.random.normal(k1, (32, 16)))
    ztxt = _unit(zimg + 0.6 * jax.random.normal(k2, (32, 16)))
    ids = jnp.arange(32) // 2  # two captions of each image: multi-positive
    return zimg, ztxt, ids


CASES = [
    ("softmax", "gather", {}),
    ("softmax", "ring", {}),
    ("softmax", "ring", {"chunk": 2}),
    ("sigmoid", "gather", {}),
    ("sigmoid", "ring", {}),
    ("sigmoid", "ring", {"chunk": 2}),
    ("triplet", "gather", {"negatives": "hardest"}),
    ("triplet", "gather", {"negatives": "semi_hard"}),
    ("triplet", "gather", {"negatives": "all", "margin": 0.5}),
]


def _args(name, ids):
    return {"softmax": (jnp.float32(10.0), ids), "sigmoid": (jnp.float32(10.0), jnp.float32(-4.0), ids)}.get(
        name, (ids,)
    )


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-12))


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize(("name", "form", "options"), CASES)
def test_sharded_equals_single_device(batch, devices, name, form, options):
    zimg, ztxt, ids = batch
    mesh = make_mesh([("data", devices)], jax.devices()[:devices])
    args = _args(name, ids)
    argnums = tuple(range(2 + len(args) - 1))  # embeddings, t and b, not ids
    loss_options = {k: v for k, v in options.items() if k != "chunk"}  # chunk is how the ring tiles, not math
    single = lambda *a: losses.LOSSES[name](*a, **loss_options)[0]
    sharded_fn = losses.sharded_loss(name, mesh, form=form, **options)
    sharded = lambda *a: sharded_fn(*a)[0]
    value, grads = jax.value_and_grad(single, argnums)(zimg, ztxt, *args)
    sharding = NamedSharding(mesh, P("data"))
    placed = [jax.device_put(x, sharding) for x in (zimg, ztxt)] + list(args[:-1]) + [jax.device_put(ids, sharding)]
    value_s, grads_s = jax.jit(jax.value_and_grad(sharded, argnums))(*placed)
    assert _rel_err(value, value_s) <= 1e-5
    for g, gs in zip(grads, grads_s, strict=True):
        assert _rel_err(g, gs) <= 1e-5
    assert float(jnp.abs(grads[0]).sum()) > 0  # the gradients are not trivially zero
    # the metrics agree too
    single_metrics = losses.LOSSES[name](zimg, ztxt, *args, **loss_options)[1]
    sharded_metrics = jax.jit(sharded_fn)(*placed)[1]
    for key, value in single_metrics.items():
        np.testing.assert_allclose(value, sharded_metrics[key], rtol=1e-5, atol=1e-6)


def test_ids_default_to_one_positive_per_row(batch):
    zimg, ztxt, _ = batch
    mesh = make_mesh([("data", 4)], jax.devices()[:4])
    expected = losses.softmax_loss(zimg, ztxt, 5.0)[0]
    got = losses.sharded_loss("softmax", mesh, form="ring")(zimg, ztxt, jnp.float32(5.0))[0]
    np.testing.assert_allclose(expected, got, rtol=1e-5)


def test_softmax_by_hand():
    zimg = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    ztxt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    loss, metrics = losses.softmax_loss(zimg, ztxt, 2.0)
    logits = 2.0 * np.array([[1.0, 0.6], [0.0, 0.8]])
    lsm = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
    i2t = -np.mean(np.diag(lsm(logits)))
    t2i = -np.mean(np.diag(lsm(logits.T)))
    np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["i2t_acc"], 1.0)
    np.testing.assert_allclose(metrics["t2i_acc"], 1.0)  # text 1: 0.8 with image 1 beats 0.6 with image 0
    # multi-positive: both texts belong to image 0 -> row 0 averages -log p over both
    loss_mp, _ = losses.softmax_loss(zimg, ztxt, 2.0, jnp.array([0, 0]))
    p = lsm(logits)
    i2t_mp = -(p[0].mean() + p[1].mean()) / 2
    p_t = lsm(logits.T)
    t2i_mp = -(p_t[0].mean() + p_t[1].mean()) / 2
    np.testing.assert_allclose(loss_mp, (i2t_mp + t2i_mp) / 2, rtol=1e-6)


def test_sigmoid_by_hand():
    zimg = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    ztxt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    loss, _ = losses.sigmoid_loss(zimg, ztxt, 3.0, -1.0)
    logits = 3.0 * np.array([[1.0, 0.6], [0.0, 0.8]]) - 1.0
    labels = 2 * np.eye(2) - 1
    expected = np.sum(np.log1p(np.exp(-labels * logits))) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_triplet_by_hand():
    zimg = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ztxt = jnp.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    sim = np.asarray(zimg @ ztxt.T)  # [[.8, 0, 1], [.6, 1, 0], [.96, .8, .6]]
    margin = 0.3
    pos = np.diag(sim)

    def per_anchor(s, p, mode):
        out = []
        for i in range(3):
            neg = np.delete(s[i], i)
            v = np.maximum(0, margin - p[i] + neg)
            if mode == "hardest":
                out.append(v.max())
            elif mode == "all":
                out.append(v[v > 0].mean() if (v > 0).any() else 0.0)
            else:
                easier = neg[neg < p[i]]
                chosen = easier.max() if easier.size else neg.max()
                out.append(max(0.0, margin - p[i] + chosen))
        return np.mean(out)

    for mode in ("hardest", "semi_hard", "all"):
        loss, _ = losses.triplet_loss(zimg, ztxt, margin=margin, negatives=mode)
        expected = (per_anchor(sim, pos, mode) + per_anchor(sim.T, pos, mode)) / 2
        np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=mode)


def test_shape_errors_are_clear(batch):
    zimg, ztxt, ids = batch
    with pytest.raises(ValueError, match=r"must both be \[B, D\]"):
        losses.softmax_loss(zimg, ztxt[:3], 1.0)
    with pytest.raises(ValueError, match=r"ids must be \[B\]"):
        losses.sigmoid_loss(zimg, ztxt, 1.0, 0.0, ids[:5])
    with pytest.raises(ValueError, match="negatives must be"):
        losses.triplet_loss(zimg, ztxt, negatives="easy")
    with pytest.raises(ValueError, match="no 'ring' form of the 'triplet' loss; it has: gather"):
        losses.sharded_loss("triplet", make_mesh(), form="ring")


def _temp_bytes(fn, global_batch, mesh, sharded, dim=64):
    sharding = NamedSharding(mesh, P("data")) if sharded else None
    spec = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sharding)
    grad = jax.jit(jax.value_and_grad(lambda a, b, t: fn(a, b, t)[0], (0, 1, 2)))
    return grad.lower(spec, spec, jax.ShapeDtypeStruct((), jnp.float32)).compile().memory_analysis().temp_size_in_bytes


def test_ring_memory_grows_linearly_naive_quadratically():
    mesh = make_mesh([("data", 8)])
    ring = losses.sharded_loss("softmax", mesh, form="ring", chunk=128)
    small, large = 4096, 8192  # per device 512 and 1024 rows
    naive_ratio = _temp_bytes(losses.softmax_loss, large, mesh, False) / _temp_bytes(
        losses.softmax_loss, small, mesh, False
    )
    ring_small, ring_large = _temp_bytes(ring, small, mesh, True), _temp_bytes(ring, large, mesh, True)
    assert naive_ratio > 3.5  # B x B logits: 4x for 2x the batch
    assert ring_large / ring_small < 2.5  # linear in the per-device batch
    assert ring_large < _temp_bytes(losses.softmax_loss, large, mesh, False) / 20
