"""Training with a pyramid: a ``transformers.Trainer`` that adds the routing loss correctly.

``PyramidTrainer`` differs from the stock Trainer in four places:

- the loss is the LM loss on answer tokens plus ``weight * routing loss``, where the routing loss
  (a per-batch mean) is divided by the gradient-accumulation steps, while the LM loss is normalised
  by the tokens of the whole accumulated batch, so neither is over-weighted;
- routing statistics (share of each expert per stage, mean kept visual tokens, FLOPs ratio) are
  logged next to the loss;
- the routers get their own learning rate (they start from scratch while the LLM is pretrained);
- checkpoints carry the pyramid (``pyramid_config.json`` + safetensors router weights) and resuming
  reloads it, so no router state is silently lost.

``train`` wires it to LLaVA-format data; ``dpn train`` is its command line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from dpn.api import apply_pyramid, has_pyramid, load_pyramid_weights, save_pyramid
from dpn.config import PyramidConfig
from dpn.lab.data.llava import LlavaCollator, LlavaDataset
from dpn.models import get_adapter

PYRAMID_PREFIX = "pyramid."


class PyramidTrainer(Trainer):
    """A Trainer for models with (or without) a pyramid; see the module docstring."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, router_learning_rate: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self._routing_history: list[dict[str, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        accumulation = self.current_gradient_accumulation_steps if model.training else 1
        lm_loss = outputs.get("lm_loss", outputs["loss"])
        if num_items_in_batch is None:
            lm_loss = lm_loss / accumulation  # a per-batch mean
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            lm_loss = lm_loss * self.accelerator.num_processes  # DDP averages gradients over processes
        loss = lm_loss
        routing_loss = outputs.get("routing_loss")
        unwrapped = self.accelerator.unwrap_model(model)
        if routing_loss is not None and model.training and has_pyramid(unwrapped):
            weight = unwrapped.pyramid.config.routing_loss_weight
            loss = loss + weight * routing_loss / accumulation
        if model.training and outputs.get("routing") is not None:
            self._routing_history.append(routing_stats(outputs["routing"], routing_loss))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._routing_history and "loss" in logs:
            keys = self._routing_history[0].keys()
            for key in keys:
                values = [h[key] for h in self._routing_history if key in h]
                logs[key] = round(sum(values) / len(values), 4)
            self._routing_history.clear()
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.router_learning_rate is not None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[str, list] = {"router": [], "decay": [], "no_decay": []}
            for name, parameter in opt_model.named_parameters():
                if not parameter.requires_grad:
                    continue
                group = "router" if name.startswith(PYRAMID_PREFIX) else "decay" if name in decay else "no_decay"
                groups[group].append(parameter)
            parameter_groups = [
                {"params": groups["decay"], "weight_decay": self.args.weight_decay},
                {"params": groups["no_decay"], "weight_decay": 0.0},
                {"params": groups["router"], "weight_decay": 0.0, "lr": self.router_learning_rate},
            ]
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_class([g for g in parameter_groups if g["params"]], **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and has_pyramid(model):
            save_pyramid(model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not isinstance(target, PreTrainedModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            load_checkpoint_weights(target, resume_from_checkpoint)
        if has_pyramid(target):
            load_pyramid_weights(target, resume_from_checkpoint)


def load_checkpoint_weights(model: PreTrainedModel, checkpoint: str | Path) -> None:
    """Load a ``save_pretrained`` checkpoint into ``model`` in place, every weight accounted for.

    transformers 5 writes some architectures (LLaVA among them) under their legacy key names
    (``language_model.model.*``), and ``Trainer``'s resume loads those files non-strictly without
    converting them: every weight is skipped with a warning and training resumes from the initial
    weights. Reloading through ``from_pretrained`` applies transformers' own key conversion.
    """
    reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    result = model.load_state_dict(reloaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(PYRAMID_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def routing_stats(routing, routing_loss: torch.Tensor | None) -> dict[str, float]:
    """Scalars to log for one batch: expert shares per stage, kept tokens, FLOPs ratio."""
    stats: dict[str, float] = {"flops_ratio": float(routing.flops_ratio.mean())}
    routed_any = routing.experts >= 0
    for stage in range(routing.experts.shape[1]):
        chosen = routing.experts[:, stage][routed_any[:, stage]]
        for expert in range(routing.router_probs[stage].shape[1]):
            share = float((chosen == expert).float().mean()) if chosen.numel() else 0.0
            stats[f"stage{stage}_expert{expert}"] = share
    with_images = routing.visual_tokens[:, 0] > 0
    if bool(with_images.any()):
        stats["kept_visual_tokens"] = float(routing.visual_tokens[with_images, -1].float().mean())
    if routing_loss is not None:
        stats["routing_loss"] = float(routing_loss.detach())
    return stats


@dataclass
class TrainOptions:
    """Everything ``train`` needs; the CLI maps one flag to each field."""

    data: str
    output_dir: str
    image_folder: str | None = None
    pyramid: str = "none"
    init_from: str | None = None
    freeze_vision: bool = False
    max_steps: int = 500
    batch_size: int = 32
    gradient_accumulation: int = 1
    learning_rate: float = 5e-4
    router_learning_rate: float | None = None
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 100
    logging_steps: int = 10
    seed: int = 0
    max_length: int = 2048
    limit: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(options: TrainOptions):
    """The model and processor to train: ``init_from`` checkpoint, or a fresh tiny LLaVA."""
    from dpn.lab import zoo

    if options.init_from:
        model, processor = zoo.load(options.init_from)
    else:
        model, processor = zoo.build_tiny(seed=options.seed)
    pyramid = PyramidConfig.from_spec(options.pyramid, model.config)
    if pyramid is not None:
        apply_pyramid(model, pyramid)
    if options.freeze_vision:
        for parameter in model.model.vision_tower.parameters():
            parameter.requires_grad_(False)
    return model, processor


def train(options: TrainOptions, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train (or resume training) and write the final model, processor and pyramid to ``output_dir``."""
    output_dir = Path(options.output_dir)
    model, processor = build_model(options)
    adapter = get_adapter(model)
    grid = adapter.visual_grid(model.config)
    dataset = LlavaDataset(
        options.data, options.image_folder, processor, image_tokens=grid[0] * grid[1],
        image_token_id=adapter.image_token_id(model.config), max_length=options.max_length, limit=options.limit,
    )
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        adam_beta2=0.98,
        max_grad_norm=options.max_grad_norm,
        save_steps=options.save_steps,
        save_total_limit=2,
        logging_steps=options.logging_steps,
        seed=options.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not options.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        save_only_model=False,
        **options.extra,
    )
    trainer = PyramidTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
        router_learning_rate=options.router_learning_rate,
        callbacks=callbacks,
    )
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is not None and options.progress:
        print(f"resuming from {last}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(output_dir))
    (output_dir / "train_options.json").write_text(json.dumps(asdict(options), indent=1))
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return output_dir
