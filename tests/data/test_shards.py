"""Web-scale shards: webdataset tars and parquet files written here (with broken samples), read as sources;
samples that cannot be used are counted by reason; the training pipeline reads every good sample once per
epoch across 2 processes and resumes at exactly the next batch."""

import collections
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jaxmr.cli import main
from jaxmr.data import DataError, caption_table, parse_source
from jaxmr.data.shards import expand
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.text import train_bpe

from conftest import COLOURS, jpeg, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    return folder, write_shards(folder)


def test_patterns_expand_braces_globs_and_folders(shards, tmp_path):
    folder, _ = shards
    assert [p.name for p in expand(f"{folder}/{{00000..00002}}.tar", (".tar",))] == [
        "00000.tar", "00001.tar", "00002.tar"]  # fmt: skip
    assert len(expand(f"{folder}/0000[01].tar", (".tar",))) == 2 and len(expand(str(folder), (".tar",))) == 3
    assert len(expand(f"{folder}/{{00000,00002}}.tar", (".tar",))) == 2
    with pytest.raises(DataError, match=r"00003\.tar does not exist"):
        expand(f"{folder}/{{00000..00009}}.tar", (".tar",))
    with pytest.raises(DataError, match=r"no \.tar files match"):
        expand(str(tmp_path), (".tar",))


def test_webdataset_shards_read_as_a_source_and_broken_samples_are_counted(shards):
    folder, want = shards
    source = parse_source(f"wds:{folder}/{{00000..00002}}.tar", "all")
    keys = [source[i]["metadata"]["key"] for i in range(len(source))]
    cut = want["cut_sample"]
    expected = [k for k, _, _ in want["good"] if k != cut]
    assert keys == expected  # every usable sample once, in shard order
    assert dict(source.skipped) == {"no caption": 1, "no image": 1, "truncated shard (its tail)": 1}
    captions = dict((k, c) for k, c, _ in want["good"])
    assert all(source.captions(i) == [captions[k]] for i, k in enumerate(keys))  # json captions too
    record = source[keys.index("000000005")]
    assert Image.open(io.BytesIO(record["image"])).size == (32, 24)
    assert record["metadata"]["json"]["url"].endswith("000000005.jpg") and record["id"] == "00000.tar/000000005"
    splits = [parse_source(f"wds:{folder}", s) for s in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == len(source) and len(splits[0]) > len(splits[1])  # 90 / 5 / 5 by key
    again = parse_source(f"wds:{folder}", "all")  # the shard indexes come from the cache now
    assert [again[i]["metadata"]["key"] for i in range(len(again))] == keys


def test_two_processes_read_every_good_sample_once_per_epoch_and_resume_exactly(shards):
    folder, _ = shards
    source = parse_source(f"wds:{folder}", "all")
    tokenizer = train_bpe(caption_table(source)[0], vocab_size=200, max_len=16)
    config = PipelineConfig(batch_size=8, image_size=16, num_epochs=1, seed=3)
    parts, skipped = [], 0
    for p in (0, 1):
        iterator = train_iterator(source, tokenizer, config, process_index=p, process_count=2)
        parts.append([int(i) for batch in iterator for i in batch["index"]])
        skipped += iterator.stats["skipped_images"]
        iterator.close()
    seen = parts[0] + parts[1]
    bad = next(i for i in range(len(source)) if source[i]["metadata"]["key"] == "000000001")
    assert len(set(seen)) == len(seen) and not set(parts[0]) & set(parts[1]) and bad not in seen
    # the epoch's whole global batches (56 of 57 samples), each process reading its 4 rows of each; the process
    # that met the bad jpg fills its batches from its next rows, so its last 3 readable rows make no whole batch
    whole = len(source) // 8 * 8
    assert (skipped, len(seen)) in ((1, whole - 4), (0, whole))  # (0, 56): the bad one was the row left out

    one = train_iterator(source, tokenizer, PipelineConfig(batch_size=8, image_size=16, seed=3))
    for _ in range(2):
        next(one)
    state = one.get_state()
    expected = next(one)
    one.close()
    resumed = train_iterator(source, tokenizer, PipelineConfig(batch_size=8, image_size=16, seed=3))
    resumed.set_state(state)
    got = next(resumed)
    resumed.close()
    for key in ("image", "text", "index"):
        np.testing.assert_array_equal(got[key], expected[key])


def write_parquet(folder):
    """A Hugging Face-style file (image struct, caption, key; two row groups; a null image and an empty
    caption) and an img2dataset-style one (jpg bytes, text)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"bytes": jpeg(i), "path": None} for i in range(10)]
    images[3] = None
    captions = [f"a {COLOURS[i % 6]} square {i}" for i in range(10)]
    captions[7] = ""
    table = pa.table({"image": images, "caption": captions, "key": [f"k{i}" for i in range(10)]})
    pq.write_table(table, folder / "hf.parquet", row_group_size=4)
    other = pa.table({"jpg": [jpeg(50 + i) for i in range(5)], "text": [f"photo {i}" for i in range(5)],
                      "width": [32] * 5})  # fmt: skip
    pq.write_table(other, folder / "img2dataset.parquet")


def test_parquet_files_read_as_a_source_with_columns_found_or_named(tmp_path, capsys):
    write_parquet(tmp_path / "pq")
    source = parse_source(f"parquet:{tmp_path / 'pq' / 'hf.parquet'}", "all")
    assert len(source) == 9 and dict(source.skipped) == {"no caption": 1}
    assert source.captions(0) == ["a red square 0"] and source[5]["id"] == "hf.parquet:5"
    assert Image.open(io.BytesIO(source[8]["image"])).size == (32, 24)  # row 8: the third row group
    assert source[3]["image"] == b""  # no bytes: an unreadable image for the pipeline to count
    both = parse_source(f"parquet:{tmp_path / 'pq'}", "all")
    assert len(both) == 14 and both.captions(13) == ["photo 4"]
    named = parse_source(f"parquet:{tmp_path / 'pq' / 'img2dataset.parquet'}:image=jpg,caption=text", "all")
    assert len(named) == 5
    with pytest.raises(DataError, match="no column 'picture'"):
        parse_source(f"parquet:{tmp_path / 'pq' / 'hf.parquet'}:image=picture", "all")
    with pytest.raises(DataError, match="not an image column"):
        parse_source(f"parquet:{tmp_path / 'pq' / 'hf.parquet'}:image=caption", "all")
    assert main(["data", "info", f"parquet:{tmp_path / 'pq'}", "--split", "all"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 14 and info["skipped"] == {"no caption": 1}


def test_conversion_to_arrayrecord_reads_back_and_counts_what_it_skipped(shards, tmp_path, capsys):
    folder, _ = shards
    spec = f"wds:{folder}"
    assert main(["data", "convert", spec, "--out", str(tmp_path / "ar"), "--shards", "4", "--no-progress"]) == 0
    assert "skipped: 1 no caption, 1 no image, 1 truncated shard (its tail), 1 undecodable image" in (
        capsys.readouterr().out)  # fmt: skip
    manifest = json.loads((tmp_path / "ar" / "manifest.json").read_text())
    converted, original = parse_source(f"arrayrecord:{tmp_path / 'ar'}", "all"), parse_source(spec, "all")
    assert len(converted) == len(original) - 1 == sum(s["records"] for s in manifest["splits"].values())
    for split in ("train", "val", "test"):  # each split kept as itself
        assert len(parse_source(f"arrayrecord:{tmp_path / 'ar'}", split)) == len(parse_source(spec, split)) - (
            split == "train" and any(k == "000000001" for k in _keys(parse_source(spec, split))))  # fmt: skip
    by_id = {original[i]["id"]: original[i] for i in range(len(original))}
    for i in range(len(converted)):
        record = converted[i]
        assert record["image"] == by_id[record["id"]]["image"]  # small JPEGs are stored as they were
        assert record["captions"] == by_id[record["id"]]["captions"] == converted.captions(i)


def _keys(source):
    return [source[i]["metadata"]["key"] for i in range(len(source))]


def test_conversion_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    spec = "shapes:n=300,size=48,n_val=30,n_test=30"
    argv = ["data", "convert", spec, "--shards", "8", "--max-side", "32", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    slow = ("import time, sys; import jaxmr.data.convert as c; encoded = c._encoded; "
            "c._encoded = lambda *a: (time.sleep(0.01), encoded(*a))[1]; from jaxmr.cli import main; "
            "sys.exit(main(sys.argv[1:]))")  # fmt: skip
    out = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-c", slow, *argv, "--out", str(out)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.done.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("*.done.json")))
    assert 1 <= done < 10 and not (out / "manifest.json").exists()  # killed part of the way through
    assert main([*argv, "--out", str(out)]) == 0
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # nothing left of the killed run's writing
    for name in names:
        if name != "manifest.json":
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    whole, resumed = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "whole", out))
    assert {k: v for k, v in whole.items() if k != "seconds"} == {k: v for k, v in resumed.items() if k != "seconds"}


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_streaming_reads_disjoint_shards_per_process_and_resumes_bitwise(kind, shards, tmp_path):
    from jaxmr.data.stream import CaptionSample, StreamConfig, StreamIterator, stream_units

    folder, want = shards
    if kind == "parquet":  # the same samples as parquet: one file, row groups of 7
        wds = parse_source(f"wds:{folder}", "all")
        rows = [wds[i] for i in range(len(wds))]
        table = pa.table({"jpg": [r["image"] for r in rows], "caption": [r["captions"][0] for r in rows],
                          "key": [r["metadata"]["key"] for r in rows]})  # fmt: skip
        pq.write_table(table, tmp_path / "s.parquet", row_group_size=7)
        spec = f"parquet:{tmp_path / 's.parquet'}"
    else:
        spec = f"wds:{folder}"
    units = stream_units(spec)
    sample = CaptionSample(units)
    tokenizer = train_bpe([c for i in range(len(sample)) for c in sample.captions(i)], 200, max_len=16)
    good = len(want["good"])  # usable samples (the bad jpg among them: it is dropped when decoded)

    # one epoch, 2 processes of batch 4 each: disjoint units, and together every usable sample once
    config = StreamConfig(batch_size=8, image_size=16, seed=5, buffer=6, num_epochs=1, read_threads=2)
    parts, skipped = [], collections.Counter()
    for p in (0, 1):
        stream = StreamIterator(units, tokenizer, config, process_index=p, process_count=2)
        batches = list(stream)
        parts.append([int(i) for batch in batches for i in batch["sample"]])
        # the loss's pair ids are the rows of the global batch: this process's half of them
        assert all(batch["index"].tolist() == list(range(4 * p, 4 * p + 4)) for batch in batches)
        skipped.update(stream.skipped)
        stream.close()
    units_of = [{i >> 32 for i in part} for part in parts]
    assert not units_of[0] & units_of[1] and units_of[0] | units_of[1] == set(range(len(units)))
    seen = parts[0] + parts[1]
    assert len(set(seen)) == len(seen)
    assert skipped["undecodable image"] == 1 and (kind == "parquet" or skipped["truncated shard (its tail)"] == 1)
    # every sample but the bad one and the last partial batch of each process (fewer than 4 rows each)
    assert good - 1 - 2 * 3 <= len(seen) <= good - 1

    # resume mid-epoch (the buffer full, inside a unit): the next batches are bitwise identical
    config = StreamConfig(batch_size=4, image_size=16, seed=5, buffer=6, read_threads=2)
    stream = StreamIterator(units, tokenizer, config)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(stream.get_state()))  # what a checkpoint keeps: plain JSON
    expected = [next(stream) for _ in range(4)]
    stream.close()
    resumed = StreamIterator(units, tokenizer, config)
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        for key in ("image", "text", "index", "sample"):
            np.testing.assert_array_equal(got[key], batch[key])
    resumed.close()


def test_training_on_streamed_shards_resumes_exactly(shards, tmp_path):
    """`data.stream_buffer`: a run stopped and resumed from its checkpoint (the stream's position and buffer in
    it) records the same losses as one that ran through."""
    from jaxmr.config import load_config_file
    from jaxmr.training.checkpoints import read_metrics
    from jaxmr.training.loop import train

    from conftest import ROOT

    folder, _ = shards
    config = load_config_file(f"{ROOT / 'configs' / 'shapes_tiny.py'}:smoke,data.source=wds:{folder},"
                              "data.stream_buffer=16,data.image_size=32,eval_every=100,steps=4,checkpoint_every=2,"
                              "log_every=1")  # fmt: skip
    train(config, tmp_path / "stopped", stop_at_step=2, progress=False)
    train(config, tmp_path / "stopped", progress=False)
    train(config, tmp_path / "through", progress=False)
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / run) if "train/loss" in m]
              for run in ("stopped", "through")]  # fmt: skip
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_data_index_builds_the_shard_cache_once_and_the_source_keeps_few_files_open(tmp_path, monkeypatch, capsys):
    import jaxmr.data.shards as shards_module

    folder = tmp_path / "wds"
    want = write_shards(folder, shards=5, per_shard=12)
    assert main(["data", "index", f"wds:{folder}", "--workers", "2", "--no-progress"]) == 0
    assert "wds:" in capsys.readouterr().out
    # indexed ahead: the source reads no tar header at its start
    monkeypatch.setattr(shards_module, "index_tar", lambda path: pytest.fail(f"{path} indexed again"))
    monkeypatch.setattr(shards_module, "OPEN_FILES", 2)
    source = parse_source(f"wds:{folder}", "all")
    assert sorted(r["metadata"]["key"] for r in (source[i] for i in range(len(source)))) == sorted(
        k for k, _, _ in want["good"]
    )
    assert len(source._files._fds) == 2  # 5 shards read, the 2 read last still open
    assert source.skipped == {"no image": 1, "no caption": 1, "truncated shard (its tail)": 1}
    parts = [parse_source(f"wds:{folder}", split) for split in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(source)
    assert main(["data", "index", "parquet:x.parquet"]) == 2  # one clear error
