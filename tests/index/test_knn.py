"""Batch kNN on the mesh (`jaxmr index knn`): every query's k nearest live vectors, as parquet rows, equal to
numpy exact search over the live rows (base + the log's adds - its deletes); near-duplicate pairs by threshold;
bad input is one clear error. The two-process run is in tests/training/test_distributed.py."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from jaxmr.cli import main
from jaxmr.index.ann import AnnConfig, exact_search
from jaxmr.index.build import write_index
from jaxmr.index.knn import KnnOptions, knn
from jaxmr.index.store import Searcher, live_arrays

from conftest import assert_exact_neighbours

DIM = 32  # the smoke model's embedding width


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def index(smoke_run, tmp_path_factory):
    """2,000 base vectors, then 100 added and 50 deleted through the log (not compacted)."""
    out = tmp_path_factory.mktemp("knn") / "index"
    write_index(out, smoke_run, unit(2000, 0), ann=AnnConfig(method="brute_force"), dtype="float32")
    searcher = Searcher(out, load_encoder=False)
    searcher.add_vectors(unit(100, 1))
    searcher.delete(list(range(0, 2100, 42)))
    return out


def live_truth(index, queries, k):
    arrays = live_arrays(index)
    vectors, ids = arrays.vectors[:][arrays.valid], arrays.ids[arrays.valid]
    rows, scores = exact_search(vectors, queries, k)
    return ids[rows], scores


def test_knn_equals_exact_search_over_the_live_rows(index, tmp_path):
    arrays = live_arrays(index)
    assert arrays.count == 2050 and len(arrays.ids) == 2100  # the deleted rows stay, unreturnable
    queries = unit(300, 2)
    summary = knn(index, queries, np.arange(300) + 10_000, tmp_path / "knn.parquet",
                  options=KnnOptions(k=10, dtype="float32", batch=128), progress=False)  # fmt: skip
    assert summary["pairs"] == 3000 and summary["live"] == 2050 and summary["devices"] == 8
    table = pq.read_table(tmp_path / "knn.parquet")
    assert table.column_names == ["query", "neighbor", "rank", "score"]
    columns = {name: table[name].to_numpy() for name in table.column_names}
    order = np.lexsort((columns["rank"], columns["query"]))
    assert (columns["query"][order] == np.repeat(np.arange(300) + 10_000, 10)).all()
    assert (columns["rank"][order] == np.tile(np.arange(10), 300)).all()
    found = columns["neighbor"][order].reshape(300, 10)
    scores = columns["score"][order].reshape(300, 10)
    want_ids, _ = live_truth(index, queries, 10)
    arrays = live_arrays(index)
    live_ids, live_vectors = arrays.ids[arrays.valid], arrays.vectors[:][arrays.valid]
    assert_exact_neighbours(found, scores, live_ids, live_vectors, queries, 10, atol=1e-5)
    assert (found != want_ids).mean() < 0.01  # random unit vectors rarely tie
    deleted = np.arange(0, 2100, 42)
    assert not np.isin(found, deleted).any() and np.isin(np.arange(2000, 2100), found).any()  # adds are found


def test_near_duplicates_by_threshold_and_without_self_matches(index, tmp_path, capsys):
    arrays = live_arrays(index)
    near = arrays.vectors[:][arrays.valid][:20] + 0.01 * unit(20, 3)  # 20 near copies of live vectors
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    np.save(tmp_path / "q.npy", np.concatenate([near, unit(30, 4)]))
    out = tmp_path / "dups.parquet"
    argv = ["index", "knn", str(index), "--queries", str(tmp_path / "q.npy"), "-k", "5", "--threshold", "0.99",
            "--dtype", "float32", "--out", str(out), "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    pairs = pq.read_table(out).to_pydict()
    assert summary["pairs"] == len(pairs["query"]) == 20  # each near copy finds its original, nothing else does
    assert pairs["query"] == list(range(20)) and pairs["neighbor"] == [int(i) for i in arrays.ids[arrays.valid][:20]]
    assert min(pairs["score"]) >= 0.99 and set(pairs["rank"]) == {0}

    # the index against itself: without --exclude-self each vector's best is itself
    assert main(["index", "knn", str(index), "--queries", "images", "-k", "3", "--out", str(tmp_path / "self.parquet"),
                 "--no-progress", "--exclude-self"]) == 0  # fmt: skip
    capsys.readouterr()
    own = pq.read_table(tmp_path / "self.parquet").to_pydict()
    assert len(own["query"]) == 3 * 2050 and all(q != n for q, n in zip(own["query"], own["neighbor"], strict=True))
    assert set(own["rank"]) == {0, 1, 2}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--queries", "wrong.npy"], "No such file"),
        (["--queries", "images", "--threshold", "2"], "threshold is a cosine similarity"),
        (["--queries", "images", "--approx", "1.5"], "approx must be"),
        (["--queries", "images", "--target", "captions"], "has no captions"),
    ],
)
def test_bad_knn_input_is_one_clear_error(index, tmp_path, capsys, argv, message):
    assert main(["index", "knn", str(index), *argv, "--out", str(tmp_path / "x.parquet"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()


def test_queries_of_another_width_are_refused(index, tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.ones((4, 7), np.float32))
    assert main(["index", "knn", str(index), "--queries", str(tmp_path / "q.npy"), "--out",
                 str(tmp_path / "x.parquet"), "--no-progress"]) == 2  # fmt: skip
    assert "7 dimensions" in capsys.readouterr().err
