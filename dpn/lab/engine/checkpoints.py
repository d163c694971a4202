"""Which of a training run's checkpoints can be resumed from, and whether the run is finished.

A run killed while the Trainer writes ``checkpoint-N`` leaves a folder with some of its files.
The Trainer writes ``trainer_state.json`` last (after the weights, the pyramid, the optimizer and
the RNG states), so a checkpoint is complete when that file is there and reads as JSON and its
weights are there too (a folder copied or pruned by hand can have the one without the other);
resuming takes the newest complete one and skips (never deletes) the others. ``train`` writes
``train_options.json`` after the final model, so its presence, with as many steps (or epochs) as
asked for, means the run is finished.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
RUN_RECORD = "train_options.json"
# What a checkpoint's weights are saved as: full weights, sharded full weights, or a LoRA adapter.
WEIGHTS = "model.safetensors"
SHARDED_WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _reads_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def has_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds its weights: one file, or an index and every shard it names."""
    if (checkpoint / WEIGHTS).is_file() or (checkpoint / ADAPTER_WEIGHTS).is_file():
        return True
    try:
        shards = set(json.loads((checkpoint / SHARDED_WEIGHTS_INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all((checkpoint / shard).is_file() for shard in shards)


def is_complete(checkpoint: Path) -> bool:
    return _reads_as_json(checkpoint / TRAINER_STATE) and has_weights(checkpoint)


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint (or None) and the incomplete ones newer than it."""
    skipped = []
    for checkpoint in checkpoints(output_dir):
        if is_complete(checkpoint):
            return checkpoint, skipped
        skipped.append(checkpoint)
    return None, skipped


def finished_run(output_dir: str | Path) -> dict | None:
    """The record of a finished run in ``output_dir`` (None: not finished)."""
    record = Path(output_dir) / RUN_RECORD
    return json.loads(record.read_text()) if _reads_as_json(record) else None


def is_finished(output_dir: str | Path, max_steps: int, num_train_epochs: float) -> bool:
    """Whether ``output_dir`` holds a finished run that already trained as far as asked."""
    record = finished_run(output_dir)
    return record is not None and covers(record, max_steps, num_train_epochs)


def covers(record: dict, max_steps: int, num_train_epochs: float) -> bool:
    """Whether a finished run already trained as far as ``max_steps`` (or, with -1, the epochs) ask."""
    if max_steps > 0:
        return record.get("global_step", 0) >= max_steps
    trained = record.get("training_args", {})
    return trained.get("max_steps") == -1 and trained.get("num_train_epochs", 0) >= num_train_epochs
