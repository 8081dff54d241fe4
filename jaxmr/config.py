"""Typed training configs: nested frozen dataclasses, `key=value` overrides that fail loudly on a typo, and
a JSON form saved in every workdir (so evaluation and serving rebuild the exact model without the .py file).

A config file is a Python module with `get_config(arg: str | None = None) -> TrainConfig`; its docstring
holds the launch command.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

from jaxmr.files import write_text
from jaxmr.models import BertConfig, ConvConfig, EfficientNetConfig, ModelConfig, MPNetConfig, TextConfig, ViTConfig
from jaxmr.options import key_value, split_items


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"  # source spec, see jaxmr.data.spec
    train_split: str = "train"
    eval_split: str = "val"
    image_size: int = 64
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random-resized-crop area range; (1, 1) = resize only
    num_workers: int = 0  # grain worker processes
    read_threads: int = 4  # reader threads per process: JPEG decoding overlaps; 0 for sources that are cheap to read
    shuffle_group: int = 1  # records shuffled as units (shapes: 2 puts each twin pair in the same batch)
    # "bpe" (learned from the training captions), "wordpiece" (MiniLM's vocabulary) or "mpnet" (all-mpnet-base-v2's)
    tokenizer: str = "bpe"
    vocab_size: int = 1024  # for "bpe"
    max_len: int = 32
    # wds: / parquet: sources: stream each process's shards through a shuffle buffer of this many samples instead
    # of reading them at random (jaxmr.data.stream; for shards too many to index); 0: random access
    stream_buffer: int = 0
    # streaming: each process draws shards with replacement (OpenCLIP's --dataset-resampled, how LAION is trained):
    # an "epoch" is then ceil(shards / processes) draws per process, a sample count rather than a pass
    resampled: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100
    end_lr_fraction: float = 0.0  # cosine decays to lr * this
    weight_decay: float = 0.1  # on matrices only (kernels, embeddings), never on biases, norms, t, b
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    freeze: tuple[str, ...] = ()  # regexes over parameter paths ("image_tower/.*" = LiT); frozen get no update


@dataclasses.dataclass(frozen=True)
class LossConfig:
    name: str = "softmax"  # softmax | sigmoid | triplet
    form: str = "gather"  # how the sharded loss is computed: gather | ring (softmax, sigmoid)
    margin: float = 0.2  # triplet
    negatives: str = "hardest"  # triplet: hardest | semi_hard | all

    def __post_init__(self) -> None:
        if self.name not in ("softmax", "sigmoid", "triplet"):
            raise ValueError(f"loss.name must be softmax, sigmoid or triplet, got {self.name!r}")
        if self.form not in ("gather", "ring"):
            raise ValueError(f"loss.form must be gather or ring, got {self.form!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: tuple[tuple[str, int], ...] = (("data", -1),)  # mesh axes; -1 takes the remaining devices
    batch_size: int = 256  # global
    grad_accum: int = 1  # GradCache micro-batches per step (all negatives kept)
    steps: int = 1000
    seed: int = 0
    log_every: int = 20
    eval_every: int = 500  # and at the end
    eval_batch_size: int = 256
    checkpoint_every: int = 500  # and at the end
    # a multi-process run asks every process whether one was told to stop (SIGTERM / SIGINT) every this many steps
    # (an all-gather, which waits for the device): a preempted run saves within this many steps
    stop_check_every: int = 10
    keep_checkpoints: int = 2  # the latest K, plus the best by best_metric
    best_metric: str = "t2i_r1"  # higher is better; a key of the evaluation's metrics
    # What every evaluation runs (`jaxmr.evaluators`): "retrieval" (R@K both ways), "classes" (class-name
    # precision and zero-shot on a labelled set), "composed"; on the run's own source and eval split, or
    # "NAME@SOURCE_SPEC" on another. The first one's metrics keep their names, the others' go under "NAME/".
    evaluators: tuple[str, ...] = ("retrieval",)
    # LiT with both towers frozen: compute the towers' features once (cached in the workdir) and train only the
    # projection heads on them — minutes instead of hours on a CPU.
    cached_features: bool = False
    # > 1 puts that many captions of each image in a batch: batch_size / captions_per_image images, each embedded
    # once, and batch_size captions, all of an image's captions positives for it (the loss has batch_size rows).
    captions_per_image: int = 1
    # cached_features: image views cached per training image, the plain resize plus feature_views - 1 augmented
    # ones (random resized crop with data.crop_scale, random flip); each step draws one view per image.
    feature_views: int = 1
    # Start from a model export (`jaxmr model import` of a CLIP / SigLIP checkpoint, or `jaxmr export` of a run):
    # its parameters and tokenizer; the model config must describe the same model.
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.captions_per_image < 1 or self.batch_size % self.captions_per_image:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of captions_per_image "
                             f"{self.captions_per_image}")  # fmt: skip
        if self.feature_views < 1:
            raise ValueError(f"feature_views must be at least 1, got {self.feature_views}")
        if self.feature_views > 1 and not self.cached_features:
            raise ValueError("feature_views > 1 needs cached_features")
        if (self.batch_size // self.captions_per_image) % self.grad_accum:
            raise ValueError(f"the {self.batch_size // self.captions_per_image} images of a batch do not split into "
                             f"grad_accum={self.grad_accum} micro-batches")  # fmt: skip
        if not self.evaluators:
            raise ValueError("evaluators must name at least one evaluator (e.g. ('retrieval',))")
        if min(self.steps, self.log_every, self.eval_every, self.checkpoint_every, self.stop_check_every) < 1:
            raise ValueError("steps, log_every, eval_every, checkpoint_every and stop_check_every must be positive")
        if self.data.resampled and self.data.stream_buffer < 1:
            raise ValueError("data.resampled draws shards for streaming: set data.stream_buffer > 0 too")


@dataclasses.dataclass(frozen=True)
class ComposedConfig:
    """Composed queries (image + modification text -> image) on a trained dual encoder: `jaxmr.training.composed`.

    The base model's image tower is frozen (gallery embeddings are computed once and cached in the workdir); a
    copy of its text tower reads the modification sentences (fine-tuned unless `train_text` is False) and TIRG
    fusion is trained with the contrastive loss between the composed query and the target image's embedding.
    """

    base: str = "runs/shapes_tiny"  # the trained dual encoder: a run directory or a model export
    data: str = "shapes-edits:n=20000,size=48,seed=0"  # a triplet source spec (jaxmr.data.triplets)
    train_split: str = "train"
    eval_split: str = "val"
    hidden: int = 0  # TIRG hidden width; 0 -> 2 x embed_dim
    train_text: bool = True
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100,
                                                                               weight_decay=0.05))  # fmt: skip
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    mesh: tuple[tuple[str, int], ...] = (("data", -1),)
    batch_size: int = 256
    steps: int = 1500
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500  # and at the end
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.loss.name == "triplet":
            raise ValueError("composed training takes loss.name softmax or sigmoid")
        if min(self.steps, self.batch_size, self.log_every, self.eval_every) < 1:
            raise ValueError("steps, batch_size, log_every and eval_every must be positive")


# Every dataclass a config may contain, by name: the JSON form records which one a field holds.
CONFIG_TYPES = {cls.__name__: cls for cls in (TrainConfig, ComposedConfig, ModelConfig, ViTConfig, ConvConfig,
                                              EfficientNetConfig, TextConfig, BertConfig, MPNetConfig, DataConfig,
                                              OptimConfig, LossConfig)}  # fmt: skip


def to_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        out = {"__type__": type(config).__name__}
        out.update({f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)})
        return out
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    return config


def from_dict(data: Any) -> Any:
    if isinstance(data, dict) and "__type__" in data:
        cls = CONFIG_TYPES[data["__type__"]]
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(from_dict(v), hints[k]) for k, v in data.items() if k != "__type__"})
    if isinstance(data, list):
        return [from_dict(v) for v in data]
    return data


def _coerce(value: Any, hint: Any) -> Any:
    """Lists from JSON back to the tuples the dataclasses declare (recursively)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, options[0]) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=False)) if args else tuple(value)
    return value


def write_config_json(config: TrainConfig, path: str | Path) -> None:
    """Writes the config as JSON, atomically (another process may be reading the file)."""
    write_text(path, json.dumps(to_dict(config), indent=2) + "\n")


def read_config_json(path: str | Path) -> TrainConfig:
    return from_dict(json.loads(Path(path).read_text()))


def claim_workdir(config: Any, workdir: str | Path, write: bool = True) -> Path:
    """Creates `workdir` and saves `config` there (`write`: in a multi-process run only process 0 writes); a
    workdir holding a run with another config is refused."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"{workdir} is a file; the workdir must be a directory (new or holding a run)")
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    if saved.exists() and read_config_json(saved) != config:
        raise ValueError(f"{workdir} holds a run with a different config; use a new --workdir (or the same config)")
    if write:
        write_config_json(config, saved)
    return workdir


def override(config: Any, key: str, raw: str, _path: str = "") -> Any:
    """A copy of `config` with the dotted `key` set to `raw` parsed as a Python literal (or kept as a string).

    An unknown key raises ValueError naming the fields that exist; the value must match the field's type.
    """
    head, _, rest = key.partition(".")
    full = _path + key
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        raise ValueError(f"unknown config key {full!r}: {type(config).__name__} has {', '.join(names)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full!r}: {head} is not a group of settings")
        return dataclasses.replace(config, **{head: override(current, rest, raw, f"{_path}{head}.")})
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(current, bool) != isinstance(value, bool) or (
        current is not None and not isinstance(value, type(current)) and not _numeric(current, value)
    ):
        raise ValueError(f"config key {full!r} is a {type(current).__name__}, got {raw!r}")
    if isinstance(current, float):
        value = float(value)
    if isinstance(current, tuple):
        value = tuple(value)
    return dataclasses.replace(config, **{head: value})


def _numeric(current: Any, value: Any) -> bool:
    return isinstance(current, float) and isinstance(value, int)


# The recipe configs (configs/ in a checkout) as installed inside the package; found without importing them.
# A checkout on the path without an install (PYTHONPATH=., as on the accelerator machine) has them beside jaxmr/.
_configs_spec = importlib.util.find_spec("jaxmr.configs")
PACKAGED_CONFIGS = (
    Path(_configs_spec.origin).parent if _configs_spec else Path(__file__).resolve().parents[1] / "configs"
)


def load_config_file(spec: str) -> TrainConfig:
    """`path/to/config.py[:arg][,key=value,...]` -> the TrainConfig it describes, overrides applied.

    After the ':' come comma-separated items; a first item with no '=' is passed to get_config(arg). Values
    may contain ':' (`data.source=captions:/data/flickr8k`) and brackets (`data.crop_scale=(0.5, 1.0)`).
    """
    path, _, tail = spec.partition(".py")
    path = Path(path + ".py")
    if not path.is_file() and path.parent == Path("configs") and (PACKAGED_CONFIGS / path.name).is_file():
        path = PACKAGED_CONFIGS / path.name  # outside a checkout: the recipes installed with jaxmr (jaxmr.configs)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"jaxmr_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    if tail and not tail.startswith(":"):
        raise ValueError(f"config spec {spec!r}: expected path.py[:arg][,key=value,...]")
    items = split_items(tail[1:]) if tail else []
    arg = items.pop(0).strip() if items and "=" not in items[0] else None
    config = module.get_config(arg) if arg is not None else module.get_config()
    return apply_overrides(config, items)


def apply_overrides(config: TrainConfig, items: list[str]) -> TrainConfig:
    for item in items:
        key, raw = key_value(item, "override")
        config = override(config, key, raw)
    return config
