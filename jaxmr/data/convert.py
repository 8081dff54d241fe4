"""Converters between data formats: a caption folder (any format `captions:DIR` reads) into a TFDS ArrayRecord
dataset, so that large folders are read fast and at random (`tfds:caption_folder/NAME`)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from jaxmr.data.records import DataError
from jaxmr.data.spec import parse_source
from jaxmr.data.tfds_source import tfds_module
from jaxmr.files import slug

log = logging.getLogger(__name__)


def build_caption_folder(source_spec: str, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Writes a caption folder (any format `captions:DIR` reads) as a TFDS ArrayRecord dataset.

    Returns the prepared dataset directory; read it back with `tfds:caption_folder/NAME` and
    `TFDS_DATA_DIR=out_dir` (or `data_dir=` in the spec). Missing or unreadable images are skipped and counted.
    """

    tfds = tfds_module()
    probe = parse_source(source_spec, split="all")
    config_name = name or slug(Path(getattr(probe, "root", "folder")).name.lower(), keep="", default="folder")
    sources = {}
    for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        try:
            sources[tfds_split] = parse_source(source_spec, split=split)
        except DataError:
            continue
    skipped: list[str] = []

    def examples(source) -> Iterator[tuple[str, dict]]:
        for i in range(len(source)):
            record = source[i]
            try:
                data = Path(record["image"]).read_bytes()
                _check_image(data)
            except (OSError, ValueError) as e:
                log.warning("skipping %s: %s", record["image"], e)
                skipped.append(str(record["image"]))
                continue
            yield record["id"], {"image": data, "captions": record["captions"], "id": record["id"]}

    class CaptionFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name)]  # noqa: RUF012 - TFDS API

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Caption folder {source_spec}, converted by jaxmr.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence(tfds.features.Text()),
                        "id": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: examples(src) for split, src in sources.items()}

        def _generate_examples(self):  # pragma: no cover - _split_generators passes generators directly
            raise NotImplementedError

    CaptionFolder.name = "caption_folder"
    builder = CaptionFolder(data_dir=str(out_dir), file_format="array_record")
    builder.download_and_prepare()
    if skipped:
        log.warning("skipped %d unreadable images while converting %s", len(skipped), source_spec)
    return Path(builder.data_dir)


def _check_image(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
