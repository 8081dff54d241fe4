"""Code paths that only an accelerator exercises (marked gpu_only: `make bench-accel` runs them on the GPU
machine; deselected in `make test`). `JAXMR_GPU_TESTS_ON_CPU=1 pytest -m gpu_only tests/test_accelerator.py`
dry-runs them on a CPU, where they check the same arithmetic without the device's own kernels."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.search_latency import recall_at_k

from conftest import assert_close_in_norm

pytestmark = [
    pytest.mark.gpu_only,
    pytest.mark.skipif(jax.default_backend() == "cpu" and not os.environ.get("JAXMR_GPU_TESTS_ON_CPU"),
                       reason="needs an accelerator (JAXMR_GPU_TESTS_ON_CPU=1 runs these on a CPU)"),
]  # fmt: skip


def test_device_search_bf16_keeps_recall_and_float32_is_exact():
    from bench.accelerator import device_clustered
    from jaxmr.index.ann import JaxExactSearch, exact_search

    database, text = device_clustered(200_000, 256, 100)
    queries, host = np.asarray(text[:100]), np.asarray(database)
    truth_rows, truth_scores = exact_search(host, queries, 10)  # numpy, float32 BLAS on the host
    rows, scores = JaxExactSearch(database, "float32")(queries, 10)
    assert recall_at_k(rows, truth_rows) >= 0.999  # exact up to ties: HIGHEST precision, not TF32
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    for batch in (1, 1024):  # one pass over the rows, and the chunked scan
        pool = np.resize(queries, (batch, 256))
        bf16_rows, _ = JaxExactSearch(database, "bfloat16")(pool, 10)
        assert recall_at_k(bf16_rows, exact_search(host, pool, 10)[0]) >= 0.99
    approx_rows, _ = JaxExactSearch(database, "bfloat16", recall_target=0.95)(queries, 10)
    assert recall_at_k(approx_rows, truth_rows) >= 0.95


def test_train_step_in_bf16_on_the_device_learns_and_matches_the_host():
    from bench.accelerator import _train_setup

    trainable, data, compiled, _ = _train_setup("tiny", 64)
    assert data["image"].devices() == {jax.devices()[0]}  # the accelerator, where there is one
    state = trainable.init()
    losses = []
    for _ in range(15):
        state, metrics = compiled(state, data)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]  # a fixed batch is memorised
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # bf16 compute, float32 parameters
    cpu_trainable, cpu_data, cpu_compiled, _ = _train_setup("tiny", 64, devices=jax.devices("cpu")[:1])
    assert cpu_data["image"].devices() == {jax.devices("cpu")[0]}
    _, cpu_metrics = cpu_compiled(cpu_trainable.init(), cpu_data)
    first = trainable.init()
    _, device_metrics = compiled(first, data)
    # bf16 activations round at 2^-8 relative; the loss of ~ln(64) agrees to a few of those
    np.testing.assert_allclose(float(device_metrics["loss"]), float(cpu_metrics["loss"]), rtol=2e-2)


def test_ring_loss_on_one_device_equals_the_naive_loss():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmr import losses
    from jaxmr.sharding import make_mesh

    mesh = make_mesh([("data", 1)])
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.device_put(jax.random.normal(k1, (4096, 128)), NamedSharding(mesh, P("data")))
    y = jax.device_put(jax.random.normal(k2, (4096, 128)), NamedSharding(mesh, P("data")))
    with jax.default_matmul_precision("highest"):
        for name, scalars in (("softmax", (10.0,)), ("sigmoid", (10.0, -10.0))):
            forms = (losses.LOSSES[name], losses.sharded_loss(name, mesh, form="ring"))
            (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(_scalar_loss, (1, 2)), static_argnums=0)(f, x, y, scalars)
                                  for f in forms)  # fmt: skip
            np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)  # a mean over 4096 rows: ~1e-7 per term
            for a, b in zip(g1, g2, strict=True):
                assert_close_in_norm(np.asarray(a), np.asarray(b))


def _scalar_loss(fn, x, y, scalars):
    return fn(x, y, *scalars)[0]


def test_serving_encoder_on_the_device_embeds_as_on_the_host(smoke_run):
    from jaxmr.encoder import Encoder
    from jaxmr.sharding import make_mesh
    from jaxmr.training.runs import load_encoder

    device = load_encoder(smoke_run)
    host = Encoder(device.config, jax.device_get(device.params), device.tokenizer, device.fingerprint,
                   mesh=make_mesh(devices=jax.devices("cpu")[:1]))  # fmt: skip
    texts = ["a red circle", "two blue squares left of a star", "three shapes"] * 3
    images = np.random.default_rng(0).integers(0, 256, (5, device.image_size, device.image_size, 3), dtype=np.uint8)
    for a, b in ((device.encode_texts(texts), host.encode_texts(texts)),
                 (device.encode_images(images), host.encode_images(images))):  # fmt: skip
        assert np.min(np.sum(a * b, axis=1)) > 0.9999  # unit vectors: cosine between the two devices' embeddings


def test_the_device_reports_its_memory():
    from bench.accelerator import QUICK, Plan, memory_limit, peak_memory

    x = jnp.ones((1024, 1024))
    x.block_until_ready()
    if jax.default_backend() == "cpu":
        assert peak_memory() is None and memory_limit(QUICK) == QUICK.memory_limit
    else:  # the suite sizes batches from these: they must exist on an accelerator
        assert memory_limit(Plan()) > 8 * 2**30 and peak_memory() >= x.nbytes
