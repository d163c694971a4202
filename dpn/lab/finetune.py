"""The lab's one fine-tuning recipe: what ``dpn compare`` and ``dpn demo`` give every variant.

A tool built on the ``train`` tool (so it sits beside the tools, not in the engine they share).

Every variant of a comparison is fine-tuned from the same base with the same data, steps, batch,
learning rates and seed; only its pyramid differs. The schedule scales with the steps: warm-up
over the first tenth, a log line every tenth, a checkpoint halfway and at the end (so an
interrupted comparison resumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpn.lab.train import DEFAULT_ROUTER_FIT_SAMPLES, PyramidTrainingArguments, TrainOptions, train

WARMUP_PARTS = 10  # warm-up over steps / WARMUP_PARTS
LOG_PARTS = 10  # a log line every steps / LOG_PARTS
CHECKPOINT_PARTS = 2  # a checkpoint every steps / CHECKPOINT_PARTS


@dataclass(frozen=True)
class Recipe:
    """What every variant shares. ``freeze_vision``: LLaVA-1.5's fine-tuning keeps the vision tower
    as pretrained (the demo does); ``train_limit``: the first N training samples."""

    steps: int
    batch_size: int
    learning_rate: float
    router_learning_rate: float
    seed: int
    train_limit: int | None = None
    freeze_vision: bool = False
    router_fit_samples: int = DEFAULT_ROUTER_FIT_SAMPLES
    progress: bool = True


def fine_tune(recipe: Recipe, base: str | Path, data: str | Path, output_dir: str | Path, pyramid: str,
              positions: str | None = None, distill_weight: float = 0.0) -> Path:
    """Fine-tune ``base`` on ``data`` with ``pyramid`` (a ``--pyramid`` spec or config path) into
    ``output_dir``; a finished run there is returned as it is, an interrupted one resumes."""
    return train(TrainOptions(
        data=str(data), pyramid=pyramid, positions=positions, init_from=str(base), freeze_vision=recipe.freeze_vision,
        router_learning_rate=recipe.router_learning_rate, limit=recipe.train_limit, progress=recipe.progress,
        router_fit_samples=recipe.router_fit_samples, distill_weight=distill_weight,
    ), PyramidTrainingArguments(
        output_dir=str(output_dir), max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate, warmup_steps=max(1, recipe.steps // WARMUP_PARTS),
        save_steps=max(1, recipe.steps // CHECKPOINT_PARTS), logging_steps=max(1, recipe.steps // LOG_PARTS),
        seed=recipe.seed,
    ))
