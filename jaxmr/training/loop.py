"""The training loop: `train(config, workdir)` trains or resumes a run (`jaxmr train` and `train/main.py` are thin
layers over it)."""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from jaxmr import distributed
from jaxmr.config import DataConfig, TrainConfig, claim_workdir
from jaxmr.data import DataError, Source, caption_table, parse_source
from jaxmr.data.stream import CaptionSample, StreamConfig, StreamIterator, stream_units
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.models import model_graph
from jaxmr.models.mpnet import mpnet_model_dir
from jaxmr.sharding import batch_axes, make_mesh
from jaxmr.text import Tokenizer, load_tokenizer, minilm_wordpiece, mpnet_tokenizer, train_bpe
from jaxmr.training.checkpoints import Checkpoints, MetricsWriter, StepTimer
from jaxmr.training.evaluators import RunEvaluation, TrainEmbedder
from jaxmr.training.lit import cached_training, check_towers_frozen
from jaxmr.training.step import build, init_state
from jaxmr.tree import param_paths

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: DataConfig, source: Source, workdir: Path, init_from: str = "") -> Tokenizer:
    """The run's tokenizer: loaded from the workdir when it is there, else made and saved there (in a
    multi-process run process 0 makes it and the others load it)."""
    path = workdir / "tokenizer"
    if not distributed.is_primary():
        distributed.barrier("tokenizer")
        return load_tokenizer(path)
    tokenizer = _make_tokenizer(config, source, path, init_from)
    distributed.barrier("tokenizer")
    return tokenizer


def _make_tokenizer(config: DataConfig, source: Source, path: Path, init_from: str) -> Tokenizer:
    if (path / "tokenizer_meta.json").exists():
        return load_tokenizer(path)
    if init_from:  # an imported or exported model brings its own tokenizer
        tokenizer = load_tokenizer(Path(init_from) / "tokenizer")
    elif config.tokenizer == "wordpiece":
        tokenizer = minilm_wordpiece(config.max_len)
    elif config.tokenizer == "mpnet":
        tokenizer = mpnet_tokenizer(mpnet_model_dir(), config.max_len)
    elif config.tokenizer == "bpe":
        texts, _ = caption_table(source)
        if not texts:
            raise DataError(f"{source.name}: no captions to learn a tokenizer from")
        tokenizer = train_bpe(texts, vocab_size=config.vocab_size, max_len=config.max_len)
    else:
        raise ValueError(f"data.tokenizer must be bpe, wordpiece or mpnet (imported models bring theirs through "
                         f"init_from), got {config.tokenizer!r}")  # fmt: skip
    tokenizer.save(path)
    return tokenizer


def check_compatible(config: TrainConfig, tokenizer: Tokenizer) -> None:
    text = config.model.text
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is {text.vocab_size}"
        )
    if tokenizer.max_len > text.max_len:
        raise ValueError(f"data.max_len {tokenizer.max_len} exceeds model.text.max_len {text.max_len}")
    image = config.model.image
    if image.image_size != config.data.image_size:
        raise ValueError(f"data.image_size {config.data.image_size} != model image_size {image.image_size}")


# ---------------------------------------------------------------------------------------------------- loop


class _Stop:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, workdir: str | Path, stop_at_step: int | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics (empty if none ran)."""

    streaming = config.data.stream_buffer > 0
    if streaming and (config.cached_features or config.captions_per_image > 1):  # config errors, said before
        raise ValueError("data.stream_buffer > 0 streams one caption per image; cached_features and "
                         "captions_per_image > 1 read the data at random (set data.stream_buffer=0)")  # fmt: skip
    if config.cached_features:  # a config error: said before the workdir is claimed and the towers' weights load
        check_towers_frozen(config, jax.tree.leaves(param_paths(model_graph(config.model)[1])))
    workdir = claim_workdir(config, workdir, write=distributed.is_primary())
    mesh = make_mesh(config.mesh)
    if streaming:  # no index of every shard: the tokenizer learns from the first captions of the stream
        units = stream_units(config.data.source)
        source = CaptionSample(units) if not (workdir / "tokenizer").exists() else None
    else:
        source = parse_source(config.data.source, config.data.train_split)
    tokenizer = build_tokenizer(config.data, source, workdir, config.init_from)
    check_compatible(config, tokenizer)
    trainable = build(config, mesh)
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints, config.best_metric)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(trainable.abstract_state())
        log.info("resumed from step %d", int(state.step))
    else:
        state, data_state = init_state(trainable), None
    if config.cached_features:
        iterator, features = cached_training(config, trainable, state.params, tokenizer, workdir, progress)
        first_embedder = features.with_params
    elif streaming:
        stream = StreamConfig(batch_size=config.batch_size, image_size=config.data.image_size, seed=config.seed,
                              crop_scale=config.data.crop_scale, buffer=config.data.stream_buffer,
                              read_threads=max(config.data.read_threads, 1),
                              resampled=config.data.resampled)  # fmt: skip
        index, count = distributed.share()
        iterator = StreamIterator(units, tokenizer, stream, index, count, mesh=mesh, data_axes=batch_axes(mesh))
        first_embedder = None
    else:
        pipeline = PipelineConfig(
            batch_size=config.batch_size // config.captions_per_image, image_size=config.data.image_size,
            seed=config.seed, crop_scale=config.data.crop_scale, num_workers=config.data.num_workers,
            shuffle_group=config.data.shuffle_group, read_threads=config.data.read_threads,
            captions_per_image=config.captions_per_image,
        )  # fmt: skip
        iterator = train_iterator(source, tokenizer, pipeline, mesh=mesh, data_axes=batch_axes(mesh))
        first_embedder = None
    evaluator = RunEvaluation(config, TrainEmbedder(trainable, tokenizer), first_embedder)
    if data_state is not None:
        iterator.set_state(data_state)
    start = int(state.step)
    writer = MetricsWriter(workdir, enabled=distributed.is_primary(), start_step=start)
    last_eval: dict = {}
    end = min(config.steps, stop_at_step or config.steps)
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or not distributed.is_primary())  # fmt: skip
    try:
        with jax.set_mesh(mesh), _Stop() as stop:
            timer = StepTimer()
            for step in range(start + 1, end + 1):
                with timer.data_wait():
                    batch = next(iterator)
                batch.pop("sample", None)  # the stream's sample ids stay on the host (for checks)
                state, metrics = trainable.step(state, batch)
                timer.steps += 1
                final = step == end
                if step % config.log_every == 0 or final:
                    metrics = jax.device_get(metrics)  # waits for the step: the window's time is all compute + data
                    metrics.update(timer.report(config.batch_size))
                    metrics["skipped_images"] = iterator.stats["skipped_images"]
                    writer.write(step, metrics, "train/")
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", ex_s=f"{metrics['examples_per_s']:.0f}",
                                    wait=f"{metrics['data_wait_share']:.0%}")  # fmt: skip
                    timer = StepTimer()
                eval_metrics = None
                if step % config.eval_every == 0 or step == config.steps:
                    eval_metrics = last_eval = evaluator(state.params)
                    writer.write(step, eval_metrics, "eval/")
                    log.info("step %d: %s", step, _summary(eval_metrics))
                    timer = StepTimer()
                # a signal to one process stops them all; asking the others is an all-gather that waits for the
                # device, so it is asked every stop_check_every steps (and at every checkpoint), not every step
                check = jax.process_count() == 1 or step % config.stop_check_every == 0
                check = check or step % config.checkpoint_every == 0 or final
                stopping = distributed.any_process(stop.requested) if check else False
                if step % config.checkpoint_every == 0 or final or stopping:
                    checkpoints.save(step, state, iterator.get_state(), eval_metrics)
                bar.update(1)
                if stopping:
                    break
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        iterator.close()
    return last_eval


def _summary(metrics: dict) -> str:
    keys = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
