import collections

import numpy as np
import pytest

from jaxmr.data import DataError, parse_source
from jaxmr.data.shapes import ShapesConfig, ShapesSource


def _bag(caption: str) -> collections.Counter:
    return collections.Counter(caption.replace(",", " ").split())


def test_deterministic_and_seeded():
    a, b = parse_source("shapes:n=50,seed=3"), parse_source("shapes:n=50,seed=3")
    c = parse_source("shapes:n=50,seed=4")
    for i in (0, 7, 49):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["captions"] == b[i]["captions"]
    assert any(a[i]["captions"] != c[i]["captions"] for i in range(10))


def test_record_layout_and_splits():
    train = parse_source("shapes:n=100,size=48,n_val=20,n_test=30", "train")
    assert (
        len(train),
        len(parse_source("shapes:n=100,n_val=20", "dev")),
        len(parse_source("shapes:n_test=30", "test")),
    ) == (100, 20, 30)
    record = train[5]
    assert record["image"].shape == (48, 48, 3) and record["image"].dtype == np.uint8
    assert len(record["captions"]) == 5 and record["id"] == "shapes-train-000005"
    assert 1 <= len(record["metadata"]["objects"]) <= 3
    # splits are different worlds
    assert train[0]["captions"] != parse_source("shapes:n=100", "test")[0]["captions"]


def test_captions_only_name_what_is_there():
    from jaxmr.data.shapes import COLORS, SHAPES

    source = ShapesSource(ShapesConfig(n=300))
    for i in range(300):
        scene, _ = source.scene(i)
        for caption in source.captions(i):
            words = set(caption.replace(",", " ").replace(":", " ").split())
            assert words & set(SHAPES) <= {o.shape for o in scene}, caption
            assert words & set(COLORS) <= {o.color for o in scene}, caption
            assert words & set(SHAPES), caption


def test_relations_are_geometrically_right():
    source = ShapesSource(ShapesConfig(n=200))
    checked = 0
    for i in range(200):
        scene, _ = source.scene(i)
        if len(scene) != 2:
            continue
        a, b = scene
        for caption in source.captions(i):
            head = f"{a.size} {a.color} {a.shape} "
            if caption.startswith(("a " + head, "one " + head)) and "left of" in caption:
                assert a.x < b.x
                checked += 1
    assert checked > 5


def test_contains_bag_of_words_hard_negatives():
    """Twins: two different images with captions made of the very same words in a different order."""
    source = ShapesSource(ShapesConfig(n=400))
    found = {"swap_colors": 0, "swap_positions": 0}
    for i in range(1, 400, 2):
        twin, info = source[i], source[i]["metadata"]
        if info["twin_of"] is None:
            continue
        original = source[i - 1]
        assert not np.array_equal(twin["image"], original["image"])
        pairs = [(p, q) for p in original["captions"] for q in twin["captions"] if p != q and _bag(p) == _bag(q)]
        assert pairs, (original["captions"], twin["captions"])
        found[info["twin_kind"]] += 1
    assert found["swap_colors"] > 20 and found["swap_positions"] > 20
    # and they are not rare: a bag-of-words model faces them in every batch
    assert sum(found.values()) > 0.25 * 200


def test_bad_options_fail_clearly():
    with pytest.raises(DataError, match="unknown option"):
        parse_source("shapes:count=5")
    with pytest.raises(DataError, match="needs a int"):
        parse_source("shapes:n=many")
    with pytest.raises(DataError, match="size must be"):
        parse_source("shapes:size=2")
    with pytest.raises(DataError, match="is empty"):
        parse_source("shapes:n_test=0", "test")


def test_cached_records_equal_drawn_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMR_CACHE", str(tmp_path))
    cached = ShapesSource(ShapesConfig(n=30, size=32))
    drawn = ShapesSource(ShapesConfig(n=30, size=32), cache=False)
    for i in range(30):  # images, captions, metadata (floats through JSON exactly) and labels
        a, b = cached[i], drawn[i]
        np.testing.assert_array_equal(a.pop("image"), b.pop("image"))
        assert a == b and cached.labels(i) == drawn.labels(i) and cached.captions(i) == drawn.captions(i)
    assert len(list((tmp_path / "shapes").glob("*.npy"))) == 1
    assert len(list((tmp_path / "shapes").glob("*-records.json"))) == 1
    cached[3]["metadata"]["objects"].clear()  # a caller's changes never reach the shared table
    assert cached[3]["metadata"] == drawn[3]["metadata"]
    import pickle

    assert len(pickle.dumps(cached)) < 2000  # neither the memory map nor the table travels to grain workers


def test_split_all_is_every_split_in_order():
    everything = parse_source("shapes:n=20,n_val=4,n_test=3,size=32", "all")
    assert len(everything) == 27 and everything.split is None
    test = parse_source("shapes:n=20,n_val=4,n_test=3,size=32", "test")
    assert everything[25]["id"] == test[1]["id"] == "shapes-test-000001"
    assert everything.captions(25) == test.captions(1)
    np.testing.assert_array_equal(everything[25]["image"], test[1]["image"])
    with pytest.raises(IndexError):
        everything[27]
