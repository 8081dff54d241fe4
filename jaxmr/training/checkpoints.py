"""What a run leaves in its workdir besides the config: orbax checkpoints (train state and the data iterators'
positions) and metrics as JSON lines plus TensorBoard events.

The data iterator's position is per process (its shards, offsets, shuffle buffer and RNG, or its grain state):
every process writes its own, `data_state/step_N/process-P-of-N.json` beside the checkpoints, before the
collective orbax save of that step, and after a restart every process reads its own back. orbax's `data` item
holds only what describes them ({format, processes}). A restart with another process count is refused with one
error (the positions cannot be re-split exactly: each process's stream is its own shards and buffer); a
checkpoint from before (the state of process 0 alone, `JsonSave` writes from the primary) restores in a
one-process run only."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from jaxmr.data.records import DataError
from jaxmr.files import write_text
from jaxmr.training.step import TrainState

DATA_STATE_FORMAT = 2  # 1 (no "format" key): the data item is process 0's iterator state itself

# --------------------------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax CheckpointManager: async saves, the latest K kept plus the best by `best_metric`; each
    checkpoint holds the train state (params, optimizer, RNG, step) and the data iterator's state."""

    def __init__(self, directory: Path, keep: int, best_metric: str):
        if jax.process_count() == 1:
            # Replica-parallel saving splits each replicated array among its devices so that many hosts share the
            # writing; in one process it only slices (one XLA compile per array shape and device: 488 compiles,
            # 18 s of a LiT run's two saves on 8 CPU devices). orbax turns it off on GPU by itself.
            absl = logging.getLogger("absl")
            level = absl.level
            absl.setLevel(logging.ERROR)  # its "overriding jax.Array" warning, once per run, is ours
            try:
                ocp.type_handlers.register_type_handler(
                    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
                )
            finally:
                absl.setLevel(level)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])  # fmt: skip
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)
        self.data_dir = directory.absolute().parent / "data_state"
        self.process, self.processes = jax.process_index(), jax.process_count()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def data_state_path(self, step: int, process: int | None = None, processes: int | None = None) -> Path:
        """Where process `process` of `processes` (default: this one) keeps its data state of step `step`."""
        process = self.process if process is None else process
        processes = self.processes if processes is None else processes
        return self.data_dir / f"step_{step}" / f"process-{process}-of-{processes}.json"

    def save(self, step: int, state: TrainState, data_state: dict, metrics: dict | None = None) -> None:
        # this process's position first (atomically): the collective save below finalises the step only after
        # every process got there, so a finished checkpoint always has every process's file
        write_text(self.data_state_path(step), json.dumps(data_state))
        meta = {"format": DATA_STATE_FORMAT, "processes": self.processes}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)
        if self.process == 0:
            self._drop_data_states(keep={step, *self.manager.all_steps()})

    def _drop_data_states(self, keep: set[int]) -> None:
        """The data states of steps whose checkpoint orbax no longer keeps (older than the newest kept)."""
        newest = max(keep)
        for folder in self.data_dir.glob("step_*"):
            number = folder.name.removeprefix("step_")
            if number.isdigit() and int(number) not in keep and int(number) < newest:
                for file in folder.iterdir():
                    file.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def restore(self, abstract_state: TrainState, step: int | None = None, data: bool = True
                ) -> tuple[TrainState, dict | None]:  # fmt: skip
        """(train state, this process's data state or None without `data`) of `step` (default: the latest).
        Without `data` any process count reads the train state (evaluation, export)."""
        step = self.manager.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], self.data_state(step, restored["data"]) if data else None

    def data_state(self, step: int, meta: dict) -> dict:
        """This process's data state of `step`, given orbax's `data` item (DataError when it cannot be had)."""
        if meta.get("format") != DATA_STATE_FORMAT:  # an older checkpoint: process 0's state alone
            if self.processes > 1:
                raise DataError(f"checkpoint step {step} holds only process 0's data position (it was written "
                                "before each process saved its own); resume it with one process, or start a new "
                                "workdir")  # fmt: skip
            return meta
        saved = int(meta["processes"])
        if saved != self.processes:
            raise DataError(f"checkpoint step {step} was written by {saved} processes and this run has "
                            f"{self.processes}: each process's data position (its shards, offsets, shuffle buffer, "
                            f"RNG) is its own and cannot be re-split exactly; resume with {saved} processes, or "
                            "start a new workdir with init_from=<an export of this run>")  # fmt: skip
        path = self.data_state_path(step)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(
                f"checkpoint step {step}: {path} is missing (each process's data position is kept there)"
            ) from None
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """Metrics as JSON lines (workdir/metrics.jsonl) and TensorBoard events (workdir/tensorboard); only process
    0 of a multi-process run writes (`enabled`).

    A run resumed from step `start_step` continues the record from there: lines of later steps (written after
    the restored checkpoint by the run that was killed) are dropped, and TensorBoard purges its events past
    that step, so that no step is recorded twice. A run from scratch (start_step 0) starts a new record."""

    def __init__(self, workdir: Path, enabled: bool = True, start_step: int = 0):
        self.path, self.enabled, self.tb = workdir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        kept = [m for m in read_metrics(workdir) if m.get("step", 0) <= start_step]
        if kept or self.path.exists():
            write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of workdir/metrics.jsonl, in order; a line cut short by a killed writer is left out."""
    path = Path(workdir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class StepTimer:
    """Where one logging window's wall-clock went: `data_wait_s` is the mean time per step the loop waited for
    the next batch (input-bound when it is a large share of `step_s`, the mean wall time per step; steps run
    asynchronously, so the rest is compute the input pipeline could hide). Read it after a device_get of the
    window's last step, so that the window's time includes its compute."""

    def __init__(self) -> None:
        self.start, self.waited, self.steps = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.waited += time.perf_counter() - start

    def report(self, batch_size: int) -> dict[str, float]:
        """examples_per_s, step_s, data_wait_s and data_wait_share of the window (`steps` counted by the caller)."""
        elapsed, steps = time.perf_counter() - self.start, max(self.steps, 1)
        return {"examples_per_s": batch_size * self.steps / elapsed, "step_s": elapsed / steps,
                "data_wait_s": self.waited / steps, "data_wait_share": self.waited / elapsed}  # fmt: skip
