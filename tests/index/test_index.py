"""The index: build (resumable), ScaNN vs exact search, add / delete without a rebuild, atomic versions."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmr.cli import main
from jaxmr.data import parse_source
from jaxmr.encoder import Encoder
from jaxmr.export import ModelMismatchError
from jaxmr.index.ann import AnnConfig, InvalidIndexError, JaxExactSearch, exact_search
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.index.collection import Collection
from jaxmr.index.store import Searcher
from jaxmr.training.exports import export_model
from jaxmr.training.runs import run_encoder
from jaxmr.tree import flatten, unflatten

from conftest import ROOT, SMOKE_SOURCE, write_image


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def smoke_index(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "shapes"
    build_index(smoke_run, SMOKE_SOURCE, out, split="test", options=BuildOptions(chunk=16), progress=False)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_exact_search_by_hand():
    database = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
    rows, scores = exact_search(database, np.array([[1, 0], [0, -1]], np.float32), k=2, chunk=3)
    assert rows.tolist() == [[0, 2], [3, 0]] or rows.tolist() == [[0, 2], [0, 3]]
    np.testing.assert_allclose(scores[0], [1.0, 0.6])
    np.testing.assert_allclose(scores[1], [0.0, 0.0])
    rows, _ = exact_search(database, np.array([[0, 1]], np.float32), k=10)  # k above N: all rows, best first
    assert rows.tolist() == [[1, 2, 0, 3]] or rows.tolist()[0][:2] == [1, 2]


def test_jax_exact_search_by_hand_and_against_numpy():
    database = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0], [0.8, 0.6]], np.float32)
    search = JaxExactSearch(database, max_scores=4)  # 2 queries -> chunks of 2 rows, a scan and a leftover row
    rows, scores = search(np.array([[1, 0], [0, 1]], np.float32), k=2)
    assert rows.tolist() == [[0, 4], [1, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.8], [1.0, 0.8]], atol=1e-6)
    assert search(np.array([[0, -1]], np.float32), k=9)[0].shape == (1, 5)  # k above N: all rows
    database, queries = unit(3000, 32, 0), unit(50, 32, 1)
    for max_scores in (1 << 25, 50 * 700):  # one pass, and 4 chunks of 700 rows + 200 left over
        rows, scores = JaxExactSearch(database, max_scores=max_scores)(queries, k=10)
        expected_rows, expected_scores = exact_search(database, queries, 10)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    rows, _ = JaxExactSearch(database, dtype="bfloat16")(queries, k=10)
    assert recall(rows, expected_rows) > 0.9  # bfloat16 rounds the scores: near-ties may swap
    assert JaxExactSearch(database, dtype="bfloat16").nbytes == database.nbytes // 2


def test_jax_search_from_a_device_array_and_with_approximate_blocks():
    import jax.numpy as jnp

    database, queries = unit(3000, 32, 0), unit(50, 32, 1)
    expected_rows, _ = exact_search(database, queries, 10)
    rows, _ = JaxExactSearch(jnp.asarray(database), max_scores=50 * 700)(queries, k=10)
    np.testing.assert_array_equal(rows, expected_rows)  # a jax.Array in: the same search, no host copy first
    approx = JaxExactSearch(database, max_scores=50 * 700, recall_target=0.9)
    rows, scores = approx(queries, k=10)
    assert rows.shape == (50, 10) and recall(rows, expected_rows) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 0)  # merged exactly: best first
    with pytest.raises(ValueError, match="recall_target"):
        JaxExactSearch(database, recall_target=1.0)
    rows, scores = JaxExactSearch(database, "bfloat16", max_scores=50 * 700, score_dtype="bfloat16")(queries, k=10)
    assert scores.dtype == np.float32 and recall(rows, expected_rows) >= 0.9  # bf16 scores: near-ties may swap


def test_auto_config_follows_scann_advice():
    assert AnnConfig().resolve(5_000).method == "brute_force"
    assert AnnConfig().resolve(50_000).method == "ah"
    big = AnnConfig().resolve(1_000_000, 256)
    assert (big.method, big.num_leaves) == ("tree_ah", 1000)
    assert 16 <= big.leaves_to_search <= big.num_leaves
    assert (big.dims_per_block, big.soar_lambda) == (4, 1.5)  # 4-bit codes of 4 dimensions, SOAR spilling
    assert AnnConfig().resolve(10**6, 64).dims_per_block == AnnConfig().resolve(50_000, 256).dims_per_block == 2
    assert AnnConfig(dims_per_block=1).resolve(10**6, 256).dims_per_block == 1
    assert AnnConfig.from_manifest({"method": "tree_ah", "dims_per_block": 2}).soar_lambda == 0.0  # older indexes
    with pytest.raises(ValueError, match="overretrieve_factor"):
        AnnConfig(soar_lambda=1.5, overretrieve_factor=0.5)
    assert AnnConfig(method="tree_ah", num_leaves=40, leaves_to_search=8).resolve(10).leaves_to_search == 8
    assert AnnConfig.from_spec(["method=tree_ah", "ann.reorder=64"]) == AnnConfig(method="tree_ah", reorder=64)
    with pytest.raises(ValueError, match=r"unknown option 'leaves=3'; options are method, num_leaves"):
        AnnConfig.from_spec(["leaves=3"])
    with pytest.raises(ValueError, match="option reorder needs a int"):
        AnnConfig.from_spec(["reorder=many"])
    with pytest.raises(ValueError, match="method must be"):
        AnnConfig(method="hnsw")


@pytest.mark.parametrize("method", ["brute_force", "ah", "tree_ah", "exact", "mesh"])
def test_collection_add_delete_equals_fresh_build(method, tmp_path):
    """1,000 added and 100 deleted over a base: the same answers as a collection built fresh from the final
    vectors; compacted into a new base (and saved and loaded), still."""
    import pyarrow as pa

    from jaxmr.index.live import LiveCollection
    from jaxmr.index.store import CAPTION_SCHEMA

    d = 32
    base, extra, queries = unit(2000, d, 0), unit(1000, d, 1), unit(50, d, 2)

    def table(ids):
        return pa.table({"id": ids, "image_id": ids, "text": [str(i) for i in ids]}, schema=CAPTION_SCHEMA)

    ann = AnnConfig(method=method, num_leaves=40, leaves_to_search=40)  # all leaves: results must be exact-like
    ids = np.arange(2000, dtype=np.int64)
    col = Collection.create(ids, base, table(ids), ann)
    new_ids = np.arange(5000, 6000, dtype=np.int64)
    live = LiveCollection.over(col).with_added(new_ids, extra, table(new_ids).to_pylist())
    gone = np.concatenate([ids[::40], new_ids[::20]])  # 50 + 50
    live = live.with_deleted(gone)
    assert len(live) == 2900 and not np.isin(gone, live.ids).any() and len(col) == 2000
    assert [r and r["text"] for r in live.records([5001, 0, 7, 5000])] == ["5001", None, "7", None]
    assert live.counts == {"base": 2000, "delta": 1000, "tombstones": 100, "count": 2900}

    keep_ids = np.setdiff1d(np.concatenate([ids, new_ids]), gone)
    all_vectors = np.concatenate([base, extra])[np.searchsorted(np.concatenate([ids, new_ids]), keep_ids)]
    fresh = Collection.create(keep_ids, all_vectors, table(keep_ids), ann)
    truth, _ = fresh.search(queries, 10, exact=True)
    np.testing.assert_array_equal(live.search(queries, 10, exact=True)[0], truth)
    found = live.search(queries, 10)[0]
    assert recall(found, truth) >= 0.95
    assert recall(found, truth) == pytest.approx(recall(fresh.search(queries, 10)[0], truth), abs=0.02)
    np.testing.assert_allclose(live.vectors(found[:, 0]) @ queries.T, (all_vectors @ queries.T)[
        np.searchsorted(keep_ids, found[:, 0])], atol=1e-6)  # fmt: skip

    compacted = live.compacted()
    assert compacted.ann == col.ann and len(compacted) == 2900 and compacted.tombstones == 0
    compacted.save(tmp_path / "c")
    again = Collection.load(tmp_path / "c", compacted.ann)
    np.testing.assert_array_equal(again.search(queries, 10, exact=True)[0], truth)
    assert recall(again.search(queries, 10)[0], truth) >= 0.95
    assert again.records([5001, 0]) == [{"id": 5001, "image_id": 5001, "text": "5001"}, None]


def test_build_search_info_and_cli(smoke_run, smoke_index, tmp_path, capsys):
    searcher = Searcher(smoke_index)
    m = searcher.manifest
    assert m["images"]["count"] == 64 and m["captions"]["count"] == 320 and m["version"] == 1
    assert m["model"]["embed_dim"] == 32 and m["source"] == {"spec": SMOKE_SOURCE, "split": "test"}
    assert m["images"]["ann"]["method"] == "brute_force" and m["config"]["model"]["embed_dim"] == 32
    zimg = np.load(smoke_index / "current" / "images" / "embeddings.npy")
    assert zimg.dtype == np.float16 and zimg.shape == (64, 32)

    # The index's embeddings are the trained model's: an image's own vector finds that image first.
    encoder = run_encoder(smoke_run)
    source = parse_source(SMOKE_SOURCE, "test")
    z = encoder.encode_images(np.stack([source[i]["image"] for i in range(5)]))
    ids, scores = searcher.search(z, k=3)
    assert ids[:, 0].tolist() == list(range(5)) and np.all(scores[:, 0] > 0.99)
    record = searcher.records([3])[0]
    assert record["captions"] == source.captions(3) and (record["width"], record["height"]) == (32, 32)
    assert searcher.image_file(3).is_file() and searcher.image_file(999) is None

    # ScaNN (brute force here) and the exact path agree; text -> captions works too.
    texts = source.captions(0)[:3]
    np.testing.assert_array_equal(searcher.search_text(texts, 5)[0], searcher.search_text(texts, 5, exact=True)[0])
    cap_ids, _ = searcher.search_text(texts, 1, target="captions")
    assert [r["text"] for r in searcher.records(cap_ids[:, 0], "captions")] == texts  # a caption finds itself

    assert main(["index", "search", str(smoke_index), texts[0], "-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and {"id", "path", "captions", "score"} <= set(results[0])
    assert main(["index", "info", str(smoke_index)]) == 0
    assert json.loads(capsys.readouterr().out)["images"]["count"] == 64

    with pytest.raises(ValueError, match=r"queries must be \[Q, 32\]"):
        searcher.search(np.zeros((1, 7), np.float32))
    with pytest.raises(ValueError, match="target must be"):
        searcher.search(z, target="faces")
    for argv, message in [
        (["index", "info", str(tmp_path)], "is not an index"),
        (["index", "search", str(smoke_index), "  "], "query is empty"),
        (["index", "build", "--workdir", str(smoke_run), "--source", SMOKE_SOURCE, "--out", str(smoke_index)],
         "already holds an index"),
        (["index", "build", "--workdir", str(tmp_path), "--source", SMOKE_SOURCE, "--out", str(tmp_path / "x")],
         "not a training run"),
    ]:  # fmt: skip
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_add_delete_persist_and_readers(smoke_index, tmp_path):
    import shutil

    index = tmp_path / "copy"
    shutil.copytree(smoke_index, index, symlinks=True)
    writer, reader = Searcher(index), Searcher(index)
    pixels = [parse_source(SMOKE_SOURCE, "train")[i]["image"] for i in range(3)]
    png = tmp_path / "upload.png"
    write_image(png, 99, size=(50, 40))
    new = writer.add([pixels[0], pixels[1], png.read_bytes()], captions=[["first added"], [], ["third", "3rd"]])
    assert new == [64, 65, 66] and writer.generation == (1, 1)  # one write, logged over the base version 1
    assert writer.records([66])[0]["path"] == "files/000000066.png" and writer.image_file(66).is_file()
    assert writer.records([66])[0]["width"] == 50
    ids, _ = writer.search(writer.encoder.encode_images(np.stack(pixels[:2])), k=1)
    assert ids[:, 0].tolist() == [64, 65]
    cap = writer.search_text(["3rd"], 1, target="captions")[0][0, 0]
    assert writer.records([cap], "captions")[0] == {"id": cap, "image_id": 66, "text": "3rd"}

    # The reader still answers from its version until it refreshes; then it sees the change.
    assert len(reader.collection()) == 64 and reader.refresh() and len(reader.collection()) == 67
    # A second writer starts from the newest version: nothing the first wrote is lost.
    assert reader.delete([64, 0, 12345]) == 2
    assert writer.add([pixels[2]]) == [67]
    final = Searcher(index)
    assert sorted(set(range(68)) - set(final.collection().ids.tolist())) == [0, 64]
    assert not (index / "files" / "000000000.png").exists()  # deleted images' own files go too
    caption_images = set(np.asarray(final.collection("captions").meta["image_id"]).tolist())
    assert 64 not in caption_images and 0 not in caption_images and 66 in caption_images
    versions = sorted(p.name for p in index.iterdir() if p.name.startswith("v"))
    assert versions == ["v000001", "v000001.log"] and os.readlink(index / "current") == "v000001"  # no copies

    with pytest.raises(Exception, match="cannot read image"):
        writer.add([b"not an image"])
    assert Searcher(index).generation == (1, 3)  # a failed add changes nothing


def test_model_mismatch_is_refused(smoke_index, smoke_run, tmp_path):
    export_model(smoke_run, tmp_path / "model")
    encoder = Encoder.load(tmp_path / "model")
    assert encoder.fingerprint == Searcher(smoke_index).manifest["model"]["fingerprint"]
    params = flatten(encoder.params)
    params["log_t"] = np.asarray(params["log_t"]) + 1.0
    other = Encoder(encoder.config, unflatten(params), encoder.tokenizer, "0123456789abcdef")
    with pytest.raises(ModelMismatchError, match="fingerprint 0123456789abcdef"):
        Searcher(smoke_index, encoder=other)


def test_unreadable_images_are_skipped(smoke_run, tsv_folder, tmp_path):
    (tsv_folder / "images" / "img3.jpg").write_bytes(b"broken")
    searcher = build_index(smoke_run, f"captions:{tsv_folder}", tmp_path / "idx", options=BuildOptions(),
                           progress=False)  # fmt: skip
    m = searcher.manifest
    assert (m["images"]["count"], m["images"]["unreadable"], m["captions"]["count"]) == (11, 1, 33)
    assert 3 not in searcher.collection().ids
    assert searcher.records([4])[0]["path"] == str((tsv_folder / "images" / "img4.jpg").resolve())
    assert (searcher.records([4])[0]["width"], searcher.records([4])[0]["height"]) == (40, 30)


def test_interrupted_build_resumes_with_identical_embeddings(smoke_run, tmp_path):
    spec = "shapes:n=3000,n_val=64,n_test=64,size=32"
    argv = [sys.executable, "-m", "jaxmr.cli", "index", "build", "--workdir", str(smoke_run), "--source", spec,
            "--chunk", "64", "--batch-size", "64", "--no-progress"]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = tmp_path / "resumed"
    proc = subprocess.Popen([*argv, "--out", str(out)], env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120
    while len(list((out / ".build").glob("images-*.npz"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "current").exists(), "the build finished before it could be killed"
    done = len(list((out / ".build").glob("images-*.npz")))
    assert 3 <= done < 3000 // 64
    with pytest.raises(InvalidIndexError, match="unfinished build"):
        Searcher(out)
    subprocess.run([*argv, "--out", str(out)], env=env, check=True, cwd=ROOT, capture_output=True)
    subprocess.run([*argv, "--out", str(tmp_path / "whole")], env=env, check=True, cwd=ROOT, capture_output=True)
    for name in ("images/embeddings.npy", "images/ids.npy", "captions/embeddings.npy"):
        np.testing.assert_array_equal(np.load(out / "current" / name), np.load(tmp_path / "whole" / "current" / name))
    assert not (out / ".build").exists()


def test_soar_tree_needs_fewer_leaves_and_takes_changes_through_tombstones(tmp_path):
    """SOAR needs fewer leaves for the same recall. ScaNN's delete crashes on its trees, so deletes are
    tombstones that no search returns (even when they are the best matches); adds go into the same searcher
    (upserted, each once) and an older snapshot does not see them; compaction clears the tombstones."""
    import pyarrow as pa

    from bench.common import clustered_vectors
    from jaxmr.index.live import LiveCollection

    database, text, _ = clustered_vectors(20_000, 32, n_queries=600, seed=3)
    ids = np.arange(len(database), dtype=np.int64)
    plain = Collection.create(ids, database, pa.table({"id": ids}), AnnConfig(method="tree_ah"), queries=text[:300])
    soar = Collection.create(ids, database, pa.table({"id": ids}), AnnConfig(method="tree_ah", soar_lambda=1.5),
                             queries=text[:300])  # fmt: skip
    assert plain.ann.soar_lambda == 0 and soar.ann.soar_lambda == 1.5
    assert soar.ann.leaves_to_search <= plain.ann.leaves_to_search
    truth = exact_search(database, text[300:], 10)[0]
    assert recall(soar.search(text[300:], 10)[0], truth) >= 0.93

    # delete every query's 3 best matches: none of them may come back, and the rest keep their order
    queries = text[300:340]
    best = exact_search(database, queries, 3)[0]
    gone = np.unique(best)
    before = LiveCollection.over(soar)
    after = before.with_deleted(gone)
    assert len(after) == 20_000 - len(gone) and after.counts["tombstones"] == len(gone) and len(before) == 20_000
    found, scores = after.search(queries, 10)
    assert found.shape == (40, 10) and not np.isin(found, gone).any()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    live = np.setdiff1d(ids, gone)
    assert recall(found, live[exact_search(database[live], queries, 10)[0]]) >= 0.9
    # the old snapshot still finds them (an approximate search: most, not all, of its top 3 are the exact top 3;
    # comparing each query's top 1 with the exact one failed on a fresh clone when one query's ANN top 1 differed)
    assert np.isin(before.search(queries, 3)[0], gone).mean() >= 0.8
    assert after.records([int(gone[0])]) == [None]

    # adds land in the same searcher; the snapshot from before them does not return them
    new = np.arange(50_000, 50_005, dtype=np.int64)
    grown = after.with_added(new, -queries[:5], [{"id": int(i)} for i in new])
    assert np.array_equal(grown.search(-queries[:5], 1)[0][:, 0], new)
    assert not np.isin(after.search(-queries[:5], 3)[0], new).any() and len(soar.scann.docids) == 20_005
    assert np.array_equal(grown.search(-queries[:5], 1)[0][:, 0], new)  # upserted once, found again

    # compaction: a new searcher without them, the same settings
    compacted = grown.compacted()
    assert compacted.tombstones == 0 and compacted.scann is not soar.scann and len(compacted) == len(grown)
    assert compacted.ann == soar.ann and len(compacted.scann.docids) == len(grown)
    found = compacted.search(queries, 10)[0]
    assert not np.isin(found, gone).any() and recall(found, live[exact_search(database[live], queries, 10)[0]]) >= 0.9
    compacted.save(tmp_path / "c")
    loaded = Collection.load(tmp_path / "c", compacted.ann)
    assert np.array_equal(loaded.search(queries, 10)[0], found)


def test_auto_config_spills_with_soar_only_for_large_trees():
    assert AnnConfig().resolve(1_000_000, 256).soar_lambda == 1.5
    assert AnnConfig().resolve(200_000, 256).soar_lambda == 0
    assert AnnConfig().resolve(10_000, 256).soar_lambda == 0
    assert AnnConfig(soar_lambda=0).resolve(1_000_000, 256).soar_lambda == 0
    assert AnnConfig(method="tree_ah", soar_lambda=2.0).resolve(1_000, 32).soar_lambda == 2.0
    with pytest.raises(ValueError, match="soar_lambda"):
        AnnConfig(soar_lambda=-0.5)


def test_tree_calibrates_leaves_on_the_queries_it_will_answer():
    import pyarrow as pa

    from bench.common import clustered_vectors

    database, text, _ = clustered_vectors(20_000, 32, n_queries=600, seed=3)
    ids = np.arange(len(database), dtype=np.int64)
    col = Collection.create(ids, database, pa.table({"id": ids}), AnnConfig(method="tree_ah"), queries=text[:300])
    assert col.ann.num_leaves == 141 and 1 <= col.ann.leaves_to_search <= 141
    assert col.calibration["recall_at_10"] >= 0.96
    truth = exact_search(database, text[300:], 10)[0]
    assert recall(col.search(text[300:], 10)[0], truth) >= 0.93  # held-out queries
    own = Collection.create(ids, database, pa.table({"id": ids}), AnnConfig(method="tree_ah"))
    assert own.calibration["queries"] == "own vectors (doubled)"
    fixed = Collection.create(ids, database, pa.table({"id": ids}), AnnConfig(method="tree_ah", leaves_to_search=5))
    assert fixed.ann.leaves_to_search == 5 and fixed.calibration is None


def test_a_tree_that_needs_every_leaf_becomes_ah_and_ties_count_as_found():
    import pyarrow as pa

    # No structure for a tree to use: 4,000 random 64-d vectors, and a target only all 16 leaves reach.
    database = unit(4000, 64, seed=5)
    ids = np.arange(len(database), dtype=np.int64)
    ann = AnnConfig(method="tree_ah", num_leaves=16, target_recall=0.995)
    col = Collection.create(ids, database, pa.table({"id": ids}), ann, queries=unit(200, 64, seed=6))
    assert col.ann.method == "ah" and col.ann.num_leaves == 0 and "16 of 16 leaves" in col.calibration["fallback"]
    assert col.calibration["recall_at_10"] >= 0.9  # measured again on the AH searcher
    # 50 distinct vectors, each 40 times (many identical captions): any ten of the tied best are right answers,
    # so recall by score reaches the target with few leaves and the tree stays.
    tied = np.repeat(unit(50, 64, seed=7), 40, axis=0)
    ids = np.arange(len(tied), dtype=np.int64)
    col = Collection.create(ids, tied, pa.table({"id": ids}), AnnConfig(method="tree_ah", num_leaves=16))
    assert col.ann.method == "tree_ah" and col.calibration["recall_at_10"] >= 0.96, col.calibration
    assert col.ann.leaves_to_search <= 8


def test_serving_encoder_cuts_text_padding_and_embeds_as_at_full_length(smoke_run, tmp_path):
    """Queries are cut to 16 tokens (or 32, ... max_len) before the text tower: the same embeddings as the
    full-length pass (float32, the same sums over fewer padded keys: within 1e-5), from shapes compiled once."""
    import jax
    from flax import nnx

    from jaxmr.models import model_graph

    export_model(smoke_run, tmp_path / "model")
    encoder = Encoder.load(tmp_path / "model", buckets=(1, 4))
    assert encoder.text_lengths == (16, 32) and encoder.warm_up() == 2 + 2 * 2  # image x 2 buckets, text x 2 x 2
    compiled = encoder.compiled_count()
    texts = ["a red circle", "a large blue square above a small green star left of a purple diamond and a circle"]
    tokens = encoder.tokenizer.encode(texts)
    assert (tokens[0] != encoder.tokenizer.pad_id).sum() <= 16 < (tokens[1] != encoder.tokenizer.pad_id).sum()
    model = nnx.merge(model_graph(encoder.config.model)[0], jax.device_get(encoder.params))
    full = np.asarray(model.encode_text(tokens))
    np.testing.assert_allclose(encoder.encode_texts(texts[:1]), full[:1], atol=1e-5)  # cut to 16 tokens
    np.testing.assert_allclose(encoder.encode_texts(texts), full, atol=1e-5)  # the long one keeps 32
    assert encoder.compiled_count() == compiled
