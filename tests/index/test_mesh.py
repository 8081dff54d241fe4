"""The mesh search backend on 8 fake CPU devices: exact mode equals numpy exact search, approximate mode reaches
its recall target, adds / deletes / compaction equal a rebuilt index and compile nothing new."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmr.index.ann import exact_search
from jaxmr.index.mesh import MeshSearch

from conftest import assert_exact_neighbours


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_mode_returns_numpy_exact_search_ids(dtype):
    assert jax.device_count() == 8
    database, queries = unit(5000, 64, 0), unit(1024, 64, 1)
    ids = np.arange(100_000, 105_000)
    index = MeshSearch(database, ids, dtype=dtype)
    assert index.data.sharding.shard_shape(index.data.shape)[0] == index.capacity // 8  # rows split 8 ways
    truth_db, truth_q = rounded(database, dtype), rounded(queries, dtype)
    for n in (1, 7, 1024):
        found, scores = index.search(queries[:n], 10)
        # over the vectors as the devices hold them (bfloat16: rounded, scored in float32)
        assert_exact_neighbours(found, scores, ids, truth_db, truth_q[:n], 10, atol=1e-5)
        rows, _ = exact_search(truth_db, truth_q[:n], 10)
        assert (found != ids[rows]).mean() < 0.01  # unit vectors in 64-d rarely tie
    assert index.search(queries[:3], 10_000)[0].shape == (3, 5000)  # k past the rows: every row


def test_approximate_mode_reaches_its_recall_target():
    from bench.common import clustered_vectors

    database, text, _ = clustered_vectors(20_000, 64, n_queries=200, seed=1)
    index = MeshSearch(database, np.arange(20_000), dtype="float32", recall_target=0.95)
    found = index.search(text, 10)[0]
    truth = exact_search(database, text, 10)[0]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95


def test_adds_deletes_and_compaction_equal_a_rebuilt_index_without_recompiling():
    base, extra, queries = unit(3000, 32, 0), unit(600, 32, 1), unit(50, 32, 2)
    index = MeshSearch(base, np.arange(3000), dtype="float32")
    index.search(queries, 10)
    (search,) = index._compiled.values()
    assert search._cache_size() == 1  # one bucket (64), one capacity
    index.add(np.arange(10_000, 10_600), extra)
    gone = np.concatenate([np.arange(0, 3000, 7), np.arange(10_000, 10_600, 5)])
    assert index.delete(gone) == len(gone) and index.delete([123_456]) == 0
    assert len(index) == 3600 - len(gone)
    all_ids = np.concatenate([np.arange(3000), np.arange(10_000, 10_600)])
    live_ids = np.setdiff1d(all_ids, gone)
    vectors = np.concatenate([base, extra])[np.searchsorted(all_ids, live_ids)]
    rebuilt = MeshSearch(vectors, live_ids, dtype="float32")
    np.testing.assert_array_equal(index.search(queries, 10)[0], rebuilt.search(queries, 10)[0])
    assert list(index._compiled.values()) == [search] and search._cache_size() == 1  # writes compiled no search
    with pytest.raises(ValueError, match="new and unique"):
        index.add([10_001], extra[:1])
    index.compact()
    assert index.dead == 0
    np.testing.assert_array_equal(index.search(queries, 10)[0], rebuilt.search(queries, 10)[0])
    # past its capacity the index grows (one recompile) and keeps every row
    grow = unit(index.capacity, 32, 3)
    index.add(np.arange(50_000, 50_000 + len(grow)), grow)
    assert index.search(grow[:5], 1)[0][:, 0].tolist() == list(range(50_000, 50_005))


def test_an_index_built_for_the_mesh_and_a_scann_index_served_on_it(smoke_run, tmp_path):
    """The same versioned storage serves with either backend: an index made with method=mesh records it and
    searches on the mesh; a ScaNN index searches on the mesh when asked; writes and compaction keep each index's
    own format and the backend asked for, with answers equal to exact search over the live rows."""
    from jaxmr.index.ann import AnnConfig
    from jaxmr.index.build import write_index
    from jaxmr.index.store import Searcher, read_manifest, verify_index

    base, extra, queries = unit(2000, 32, 0), unit(300, 32, 1), unit(40, 32, 2)
    for name, ann, backend in (("mesh", AnnConfig(method="mesh", device_dtype="float32"), None),
                               ("scann", AnnConfig(method="ah"), "mesh")):  # fmt: skip
        out = tmp_path / name
        write_index(out, smoke_run, base, ann=ann, dtype="float32")
        searcher = Searcher(out, load_encoder=False, backend=backend)
        assert searcher.backends() == {"images": "mesh", "captions": None}
        added = searcher.add_vectors(extra)
        searcher.delete(list(range(0, 2000, 10)) + added[::3])
        live = searcher.collection("images")
        for step in ("writes", "compacted"):
            found, scores = searcher.search(queries, 10)
            vectors = live.embeddings.astype(np.float32)
            if name == "mesh":  # float32 on the devices: exact search over the live rows
                assert_exact_neighbours(found, scores, live.ids, vectors, queries, 10, atol=1e-5)
            else:  # ScaNN's index served on the mesh in bfloat16: exact over the rounded vectors and queries
                assert_exact_neighbours(found, scores, live.ids, rounded(vectors, jnp.bfloat16),
                                        rounded(queries, jnp.bfloat16), 10, atol=1e-5)  # fmt: skip
            assert searcher.collection("images").contains(found).all()
            if step == "writes":
                assert searcher.compact() is not None
        assert searcher.backends()["images"] == "mesh"
        assert read_manifest(out)["images"]["ann"]["method"] == ann.method  # the index's own format kept
        verify_index(out)
        assert Searcher(out, load_encoder=False).backends()["images"] == ("mesh" if name == "mesh" else "scann")
