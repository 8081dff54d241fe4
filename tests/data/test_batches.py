import logging

import jax
import numpy as np
import pytest

from jaxmr.data import DataError, caption_table, parse_source
from jaxmr.data.eval_batches import EvalStats, eval_caption_batches, eval_image_batches
from jaxmr.data.images import ImageReadError, decode
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.sharding import make_mesh
from jaxmr.text import train_bpe


@pytest.fixture(scope="module")
def shapes():
    return parse_source("shapes:n=96,size=32")


@pytest.fixture(scope="module")
def tokenizer(shapes):
    return train_bpe(caption_table(shapes)[0], vocab_size=300, max_len=64)


def _take(iterator, n):
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def test_batches_have_the_documented_layout(shapes, tokenizer):
    (batch,) = _take(train_iterator(shapes, tokenizer, PipelineConfig(batch_size=16, image_size=32)), 1)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (16, 64) and batch["text"].dtype == np.int32
    # each row's caption is one of that image's captions
    for row in range(16):
        index = int(batch["index"][row])
        assert np.array_equal(batch["image"][row], shapes[index]["image"])
        assert tokenizer.decode(batch["text"][row])[0] in [c.lower() for c in shapes.captions(index)]


def test_k_captions_per_image(shapes, tokenizer):
    config = PipelineConfig(batch_size=8, image_size=32, captions_per_image=3)
    (batch,) = _take(train_iterator(shapes, tokenizer, config), 1)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["text"].shape == (8, 3, 64)
    distinct = 0
    for row in range(8):
        captions = [c.lower() for c in shapes.captions(int(batch["index"][row]))]
        texts = tokenizer.decode(batch["text"][row])
        assert set(texts) <= set(captions) and len(texts) == 3
        if len(set(captions)) == len(captions):  # 3 different captions of the 5
            assert len(set(texts)) == 3
            distinct += 1
    assert distinct >= 4
    with pytest.raises(ValueError, match="captions_per_image"):
        PipelineConfig(captions_per_image=0)


def test_epochs_cover_everything_in_a_new_order(shapes, tokenizer):
    batches = _take(train_iterator(shapes, tokenizer, PipelineConfig(batch_size=32, image_size=32, seed=1)), 6)
    epoch1 = np.concatenate([b["index"] for b in batches[:3]])
    epoch2 = np.concatenate([b["index"] for b in batches[3:]])
    assert sorted(epoch1) == sorted(epoch2) == list(range(96))
    assert not np.array_equal(epoch1, epoch2)
    # and the caption choice is random per step: the same image does not always get the same caption
    other = _take(train_iterator(shapes, tokenizer, PipelineConfig(batch_size=32, image_size=32, seed=2)), 3)
    assert not np.array_equal(epoch1, np.concatenate([b["index"] for b in other]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_identical_next_batch(shapes, tokenizer, workers):
    config = PipelineConfig(batch_size=8, image_size=32, num_workers=workers, seed=5, crop_scale=(0.5, 1.0))
    iterator = train_iterator(shapes, tokenizer, config)
    try:
        for _ in range(13):  # crosses an epoch boundary (12 batches an epoch)
            next(iterator)
        state = iterator.get_state()
        expected = [next(iterator) for _ in range(2)]
    finally:
        iterator.close()
    resumed = train_iterator(shapes, tokenizer, config)
    resumed.set_state(state)
    got = _take(resumed, 2)
    for want, have in zip(expected, got, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])


@pytest.fixture
def folder_with_bad_images(tsv_folder):
    (tsv_folder / "images" / "img1.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (tsv_folder / "images" / "img2.jpg").unlink()
    return tsv_folder


def test_unreadable_images_are_skipped_and_counted(folder_with_bad_images, caplog):
    source = parse_source(f"captions:{folder_with_bad_images}", "train")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=120, max_len=12)
    config = PipelineConfig(batch_size=6, image_size=16, num_epochs=1)
    iterator = train_iterator(source, tokenizer, config)
    with caplog.at_level(logging.WARNING):
        batches = list(iterator)
    iterator.close()
    assert len(batches) == 1 and iterator.stats == {"skipped_images": 2}
    assert not {1, 2} & set(batches[0]["index"].tolist())
    assert "img1.jpg" in caplog.text and "img2.jpg" in caplog.text
    assert iterator.get_state()["skipped_images"] == 2


def test_strict_mode_names_the_file(folder_with_bad_images):
    source = parse_source(f"captions:{folder_with_bad_images}", "train")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=120, max_len=12)
    iterator = train_iterator(source, tokenizer, PipelineConfig(batch_size=8, image_size=16, strict=True, seed=0))
    with pytest.raises(ImageReadError, match=r"img[12]\.jpg"):
        _take(iterator, 1)


def test_worker_errors_show_their_cause(folder_with_bad_images):
    source = parse_source(f"captions:{folder_with_bad_images}", "train")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=120, max_len=12)
    config = PipelineConfig(batch_size=8, image_size=16, strict=True, num_workers=2)
    with pytest.raises(Exception, match=r"cannot read image .*img[12]\.jpg"):
        _take(train_iterator(source, tokenizer, config), 1)


def test_images_without_captions_cannot_train(tmp_path, tokenizer):
    from conftest import write_image

    write_image(tmp_path / "a.jpg", 3)
    with pytest.raises(DataError, match="has no captions"):
        _take(train_iterator(parse_source(f"images:{tmp_path}"), tokenizer, PipelineConfig(batch_size=1)), 1)


def test_never_flips(tmp_path):
    from conftest import write_image

    write_image(tmp_path / "x.png", 0, size=(64, 48))  # left half green, right half black
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = decode(str(tmp_path / "x.png"), 16, crop_scale=(0.3, 1.0), rng=rng)
        assert image[:, 0, 1].mean() >= image[:, -1, 1].mean()


def test_sharded_global_batches_on_8_devices(shapes, tokenizer):
    assert jax.device_count() == 8
    mesh = make_mesh([("data", -1)])
    (batch,) = _take(train_iterator(shapes, tokenizer, PipelineConfig(batch_size=16, image_size=32), mesh=mesh), 1)
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (16, 32, 32, 3)
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert {s.data.shape for s in batch["text"].addressable_shards} == {(2, 64)}
    (plain,) = _take(train_iterator(shapes, tokenizer, PipelineConfig(batch_size=16, image_size=32)), 1)
    np.testing.assert_array_equal(np.asarray(batch["index"]), plain["index"])


def test_per_process_slices_partition_the_data(shapes, tokenizer):
    """Two processes read disjoint halves, and their halves side by side are the one-process batches, pixels,
    crops and caption choices included (so a 2-process run trains on exactly the same batches)."""
    config = PipelineConfig(batch_size=16, image_size=32, num_epochs=1, crop_scale=(0.5, 1.0))
    halves = [_take(train_iterator(shapes, tokenizer, config, process_index=p, process_count=2), 6) for p in (0, 1)]
    assert all(len(b["index"]) == 8 for part in halves for b in part)
    seen = [set(np.concatenate([b["index"] for b in part]).tolist()) for part in halves]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(96))
    whole = _take(train_iterator(shapes, tokenizer, config, process_index=0, process_count=1), 6)
    for one, first, second in zip(whole, *halves, strict=True):
        for key in ("index", "image", "text"):
            np.testing.assert_array_equal(one[key], np.concatenate([first[key], second[key]]))
    with pytest.raises(ValueError, match="not divisible"):
        train_iterator(shapes, tokenizer, PipelineConfig(batch_size=15), process_index=0, process_count=2)


def test_eval_iteration_sees_everything_once(folder_with_bad_images):
    source = parse_source(f"captions:{folder_with_bad_images}", "all")
    stats = EvalStats()
    batches = list(eval_image_batches(source, image_size=16, batch_size=5, stats=stats))
    assert [len(b["mask"]) for b in batches] == [5, 5, 5]
    indices = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert sorted(indices.tolist()) == [i for i in range(12) if i not in (1, 2)]
    assert stats.n_images == 12 and sorted(stats.unreadable_images) == [1, 2]
    assert not batches[-1]["mask"][2:].any()  # padding rows

    texts, owners = caption_table(source)
    tokenizer = train_bpe(texts, vocab_size=120, max_len=40)
    caption_batches = list(eval_caption_batches(texts, owners, tokenizer, batch_size=16, stats=stats))
    assert stats.n_captions == 36 and sum(int(b["mask"].sum()) for b in caption_batches) == 36
    assert np.concatenate([b["image_index"][b["mask"]] for b in caption_batches]).tolist() == owners.tolist()
    assert tokenizer.decode(caption_batches[0]["text"][:1])[0] == texts[0]


def test_flickr8k_pipeline(flickr8k):
    source = parse_source(f"captions:{flickr8k}", "dev")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=2000, max_len=32)
    config = PipelineConfig(batch_size=8, image_size=224, crop_scale=(0.6, 1.0))
    (batch,) = _take(train_iterator(source, tokenizer, config), 1)
    assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].std() > 10


def test_shuffle_groups_keep_twins_together(shapes, tokenizer):
    config = PipelineConfig(batch_size=16, image_size=32, shuffle_group=2, num_epochs=1)
    batches = _take(train_iterator(shapes, tokenizer, config), 6)
    for batch in batches:
        pairs = batch["index"].reshape(-1, 2)
        assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] == pairs[:, 0] + 1).all()
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(96))
