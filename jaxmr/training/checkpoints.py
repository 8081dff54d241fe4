"""What a run leaves in its workdir besides the config: orbax checkpoints (train state and the data iterator's
position) and metrics as JSON lines plus TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from jaxmr.training.step import TrainState

# --------------------------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax CheckpointManager: async saves, the latest K kept plus the best by `best_metric`; each
    checkpoint holds the train state (params, optimizer, RNG, step) and the data iterator's state."""

    def __init__(self, directory: Path, keep: int, best_metric: str):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])  # fmt: skip
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        step = self.manager.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """Metrics as JSON lines (workdir/metrics.jsonl) and TensorBoard events (workdir/tensorboard); only process
    0 of a multi-process run writes (`enabled`)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path, self.enabled, self.tb = workdir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

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
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
