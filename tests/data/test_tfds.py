"""TFDS sources: through `tfds.testing.mock_data` (no files at all) and through a real ArrayRecord build."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxmr.data import DataError, parse_source  # noqa: E402
from jaxmr.data.convert import build_caption_folder  # noqa: E402

from conftest import write_image  # noqa: E402


class ToyCaptions(tfds.core.GeneratorBasedBuilder):
    """A registered image-caption builder shaped like coco_captions (captions as a sequence of dicts)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "image/id": tfds.features.Scalar(np.int64),
                    "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):  # only mock_data fills this dataset
        yield from ()


def test_mock_data_source():
    with tfds.testing.mock_data(num_examples=6):
        train = parse_source("tfds:toy_captions", "train")
        assert len(train) == 6
        record = train[2]
        assert record["image"].ndim == 3 and record["image"].dtype == np.uint8
        assert record["captions"] and all(isinstance(c, str) for c in record["captions"])
        assert len(parse_source("tfds:toy_captions:val", "train")) == 6  # a split in the spec wins; val -> validation


def test_unprepared_dataset_fails_clearly(tmp_path):
    with pytest.raises(DataError, match=r"cannot open TFDS dataset 'toy_captions' split 'train'.*Prepare it first"):
        parse_source(f"tfds:toy_captions:data_dir={tmp_path}", "train")


def test_caption_folder_to_array_record(tsv_folder, tmp_path):
    write_image(tsv_folder / "images" / "broken.jpg", 1)
    (tsv_folder / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    with (tsv_folder / "captions.tsv").open("a") as f:
        f.write("broken.jpg\ttrain\ta broken image\n")
    path = build_caption_folder(f"captions:{tsv_folder}", tmp_path / "tfds", name="toy")
    assert (path / "dataset_info.json").exists()
    train = parse_source(f"tfds:caption_folder/toy:train:data_dir={tmp_path / 'tfds'}")
    dev = parse_source(f"tfds:caption_folder/toy:dev:data_dir={tmp_path / 'tfds'}")
    assert (len(train), len(dev)) == (8, 2)  # the broken image was skipped
    original = parse_source(f"captions:{tsv_folder}", "dev")
    assert {dev[i]["id"] for i in range(2)} == {original[i]["id"] for i in range(2)}
    assert sorted(dev[0]["captions"]) == sorted(
        original.captions([original[i]["id"] for i in range(2)].index(dev[0]["id"]))
    )
    assert dev[0]["image"].shape == (30, 40, 3)
