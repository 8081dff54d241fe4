import json
from pathlib import Path

import pytest

from jaxmr.data import DataError, parse_source
from jaxmr.data.captions import hash_split

from conftest import write_image


def test_tsv_with_split_column(tsv_folder):
    train = parse_source(f"captions:{tsv_folder}", "train")
    dev = parse_source(f"captions:{tsv_folder}", "dev")
    assert (len(train), len(dev), len(parse_source(f"captions:{tsv_folder}", "val"))) == (8, 2, 2)
    record = dev[0]
    assert record["id"] == "img8.jpg" and record["captions"][0] == "picture number 8 caption 0"
    assert len(record["captions"]) == 3 and Path(record["image"]).is_file()
    assert len(parse_source(f"captions:{tsv_folder}", "all")) == 12


def test_flickr8k_token_with_split_lists(tmp_path):
    for i in range(4):
        write_image(tmp_path / "Flicker8k_Dataset" / f"{i}.jpg", i)
    (tmp_path / "Flickr8k.token.txt").write_text(
        "".join(f"{i}.jpg#{k}\tcap {i} {k}\n" for i in range(4) for k in range(5))
    )
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("0.jpg\n1.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("2.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("3.jpg\n")
    train = parse_source(f"captions:{tmp_path}", "train")
    assert len(train) == 2 and train[1]["captions"] == [f"cap 1 {k}" for k in range(5)]
    assert parse_source(f"captions:{tmp_path}", "test")[0]["id"] == "3.jpg"
    assert Path(train[0]["image"]).parent.name == "Flicker8k_Dataset"


def test_flickr30k_results_csv(tmp_path):
    rows = ["image_name| comment_number| comment"] + [
        f"{i}.jpg| {k}| a photo {i}, number {k}" for i in range(30) for k in range(5)
    ]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")
    everything = parse_source(f"captions:{tmp_path}", "all")
    assert len(everything) == 30 and everything[3]["captions"][2] == "a photo 3, number 2"
    # no split column: a deterministic hash split
    train = parse_source(f"captions:{tmp_path}", "train")
    assert {r["id"] for r in (train[i] for i in range(len(train)))} == {
        f"{i}.jpg" for i in range(30) if hash_split(f"{i}.jpg") == "train"
    }


def test_karpathy_json(tmp_path):
    images = [
        {
            "filename": f"{i}.jpg",
            "filepath": "val2014",
            "split": s,
            "sentences": [{"raw": f"c{i}a"}, {"raw": f"c{i}b"}],
        }
        for i, s in enumerate(["train", "restval", "val", "test"])
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    train = parse_source(f"captions:{tmp_path}", "train")
    assert [train[i]["id"] for i in range(len(train))] == ["val2014/0.jpg", "val2014/1.jpg"]
    assert parse_source(f"captions:{tmp_path}", "val")[0]["captions"] == ["c2a", "c2b"]


def test_coco_captions_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        data = {
            "images": [{"id": 10 + i, "file_name": f"{split}_{i}.jpg"} for i in range(3)],
            "annotations": [
                {"image_id": 10 + i, "id": k, "caption": f"{split} {i} {k} "} for i in range(3) for k in range(5)
            ],
        }
        (tmp_path / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(data))
        for i in range(3):
            write_image(tmp_path / f"{split}2017" / f"{split}_{i}.jpg", i)
    val = parse_source(f"coco:{tmp_path}", "val")
    assert len(val) == 3 and val[1]["captions"][4] == "val 1 4"
    assert Path(val[0]["image"]).is_file() and Path(val[0]["image"]).parent.name == "val2017"
    with pytest.raises(DataError, match="COCO has train and val"):
        parse_source(f"coco:{tmp_path}", "test")


def test_headerless_csv(tmp_path):
    (tmp_path / "captions.csv").write_text('a.jpg,first caption,train\nb.jpg,"second, with comma",test\n')
    assert parse_source(f"captions:{tmp_path}", "test")[0]["captions"] == ["second, with comma"]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("captions.tsv", "image\tsplit\tcaption\na.jpg\ttrain\tok\nb.jpg\ttrain\n", "captions.tsv:3"),
        ("captions.tsv", "image\tsplit\tcaption\na.jpg\tholdout\tok\n", "captions.tsv:2"),
        ("Flickr8k.token.txt", "a.jpg#0\tok\nb.jpg no tab here\n", "Flickr8k.token.txt:2"),
        ("dataset_x.json", '{"images": [\n{"filename": "a.jpg",\n}]}', "dataset_x.json:3"),
        ("results.csv", "image_name| comment_number| comment\na.jpg| 0|\n", "results.csv:2"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=where.replace(".", r"\.")):
        parse_source(f"captions:{tmp_path}", "all")


def test_empty_split_and_missing_folder(tsv_folder, tmp_path):
    (tsv_folder / "captions.tsv").write_text("image\tsplit\tcaption\na.jpg\ttrain\tonly train\n")
    with pytest.raises(DataError, match=r"split 'test' .* is empty; available splits: train \(1 images\)"):
        parse_source(f"captions:{tsv_folder}", "test")
    with pytest.raises(DataError, match="does not exist"):
        parse_source(f"captions:{tmp_path / 'nope'}")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="no captions file"):
        parse_source(f"captions:{tmp_path / 'bare'}")
    with pytest.raises(DataError, match="unknown data source"):
        parse_source("photos:/x")
    with pytest.raises(DataError, match="needs a directory"):
        parse_source("captions:")


def test_image_folder(tmp_path):
    for name in ("b/2.png", "a/1.jpg", "c.webp"):
        write_image(tmp_path / name, 5)
    (tmp_path / "notes.txt").write_text("not an image")
    source = parse_source(f"images:{tmp_path}")
    assert [source[i]["id"] for i in range(len(source))] == ["a/1.jpg", "b/2.png", "c.webp"]
    assert source[0]["captions"] == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        parse_source(f"images:{tmp_path / 'empty'}")


def test_flickr8k(flickr8k):
    dev = parse_source(f"captions:{flickr8k}", "dev")
    train = parse_source(f"captions:{flickr8k}", "train")
    assert (len(train), len(dev)) == (6097, 984)
    assert sum(len(dev.captions(i)) for i in range(len(dev))) >= 984 * 5 - 20
    assert Path(dev[0]["image"]).is_file()
    with pytest.raises(DataError, match="available splits"):
        parse_source(f"captions:{flickr8k}", "test")


@pytest.mark.parametrize("name", ["ABSOLUTE", "../../secret.jpg", "sub/../../../secret.jpg"])
def test_image_names_outside_the_folder_are_refused_unless_allowed(tsv_folder, tmp_path_factory, name):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.jpg"
    write_image(outside, 99)
    if name != "ABSOLUTE":  # relative names (resolved in images/) climb out of the folder to a sibling of it
        write_image(tsv_folder.parent / "secret.jpg", 99)
    name = str(outside) if name == "ABSOLUTE" else name
    with (tsv_folder / "captions.tsv").open("a") as f:
        f.write(f"{name}\ttrain\ta picture kept outside\n")
    with pytest.raises(DataError, match=r"point outside .*allow_outside=1"):
        parse_source(f"captions:{tsv_folder}", "train")
    allowed = parse_source(f"captions:{tsv_folder}:allow_outside=1", "train")
    assert Path(allowed[len(allowed) - 1]["image"]).name == "secret.jpg"
    with pytest.raises(DataError, match="unknown option"):
        parse_source(f"captions:{tsv_folder}:allow_outside=1,sneaky=2", "train")
