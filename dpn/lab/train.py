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

With ``TrainOptions.lora_r`` (``dpn train --lora-r R``) the model is wrapped by ``dpn.lab.lora.add_lora``:
only LoRA adapters on the language model's projections and the routers train. Checkpoints then hold
the adapter (peft's files) and the routers, and resume into the wrapped model; the final output is
the merged model (what ``dpn eval`` and ``zoo.load`` read, as after a full run), with the adapter
itself in ``OUTPUT/lora``.

``train`` wires it to LLaVA-format data. Its arguments are two dataclasses: ``TrainOptions`` (dpn's
own: data, pyramid, ...) and ``PyramidTrainingArguments`` (``transformers.TrainingArguments`` with
dpn's defaults: cosine schedule, lr 5e-4, adam_beta2 0.98, ...). ``dpn train`` is their command line
(``train_parser``, a ``transformers.HfArgumentParser``): every Trainer option is a flag there.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import SchedulerType, set_seed

from dpn import presets
from dpn.config import POSITION_MODES
from dpn.api import apply_pyramid, get_pyramid, has_pyramid, load_pyramid_weights, pyramid_disabled, save_pyramid
from dpn.lab.engine.checkpoints import RUN_RECORD, finished_run, is_finished, last_complete_checkpoint
from dpn.lab.families import family_images
from dpn.lab.data.llava import DIFFICULTY, LlavaCollator, LlavaDataset
from dpn.lab.lora import DEFAULT_LORA_TARGETS, add_lora, check_adapter_matches, is_adapter_checkpoint, is_lora, merged
from dpn.lab.engine.pyramids import prompt_router_token, pyramid_from_spec
from dpn.supervision import IGNORE_INDEX
from dpn.router_fit import FitReport, fit_routers

PYRAMID_PREFIX = "pyramid."
# Fitted routers (router_training="fit") learn from this many training samples after training.
DEFAULT_ROUTER_FIT_SAMPLES = 1024
ROUTER_FIT_RECORD = "router_fit.json"
LORA_FOLDER = "lora"  # a LoRA run's adapter (peft's files) and routers, beside the merged model


def is_router_parameter(name: str) -> bool:
    """Whether parameter ``name`` belongs to the pyramid (also inside a wrapper such as peft's)."""
    return name.startswith(PYRAMID_PREFIX) or f".{PYRAMID_PREFIX}" in name


class PyramidTrainer(Trainer):
    """A Trainer for models with (or without) a pyramid; see the module docstring."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, router_learning_rate: float | None = None, distill_weight: float = 0.0,
                 full_path_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self.distill_weight = distill_weight
        self.full_path_weight = full_path_weight
        self._routing_history: list[dict[str, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        difficulties = inputs.get(DIFFICULTY)
        inputs = {k: v for k, v in inputs.items() if k != DIFFICULTY}  # a tag for the logs, not a model input
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        unwrapped = self.accelerator.unwrap_model(model)
        pyramid = get_pyramid(unwrapped) if has_pyramid(unwrapped) else None
        if model.training and hasattr(pyramid, "set_training_progress"):  # a router temperature schedule's clock
            pyramid.set_training_progress(self.state.global_step / max(1, self.state.max_steps - 1))
        outputs = model(**inputs)
        accumulation = self.current_gradient_accumulation_steps if model.training else 1
        lm_loss = self._step_loss(outputs.get("lm_loss", outputs["loss"]), num_items_in_batch, accumulation)
        loss = lm_loss
        routing_loss = outputs.get("routing_loss")
        if model.training and pyramid is not None:  # the routing loss is a per-batch mean
            loss = pyramid.total_loss(lm_loss, routing_loss, scale=1 / accumulation)
            if self.distill_weight or self.full_path_weight:
                full = full_path_forward(model, unwrapped, inputs, train=bool(self.full_path_weight))
                if self.full_path_weight:
                    loss = loss + self.full_path_weight * self._step_loss(full.loss, num_items_in_batch, accumulation)
                if self.distill_weight:
                    loss = loss + self.distill_weight * distillation_loss(outputs, full.logits.detach(),
                                                                          inputs["labels"]) / accumulation
        if model.training and outputs.get("routing") is not None:
            self._routing_history.append(routing_stats(outputs["routing"], routing_loss, difficulties))
        return (loss, outputs) if return_outputs else loss

    def _step_loss(self, lm_loss: torch.Tensor, num_items_in_batch, accumulation: int) -> torch.Tensor:
        """The model's LM loss as a share of the optimizer step's: the model normalises by the tokens of
        the whole accumulated batch when it is given their count, else per batch."""
        if num_items_in_batch is None:
            return lm_loss / accumulation  # a per-batch mean
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            return lm_loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return lm_loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._routing_history and "loss" in logs:
            keys = dict.fromkeys(key for history in self._routing_history for key in history)
            for key in keys:  # per-difficulty keys are missing from batches without that difficulty
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
                group = "router" if is_router_parameter(name) else "decay" if name in decay else "no_decay"
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
        check_checkpoint_kind(target, resume_from_checkpoint)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not isinstance(target, PreTrainedModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            load_checkpoint_weights(target, resume_from_checkpoint)
        if has_pyramid(target):
            load_pyramid_weights(target, resume_from_checkpoint)


def check_checkpoint_kind(model: Any, checkpoint: str | Path) -> None:
    """Refuse to resume a LoRA run's checkpoint (an adapter) into a full model, or the reverse, or an
    adapter of another rank, alpha or targets: the Trainer would skip the weights and go on from the
    initial ones."""
    adapter = is_adapter_checkpoint(checkpoint)
    if adapter and not is_lora(model):
        raise ValueError(f"{checkpoint} holds a LoRA adapter (a run with --lora-r): resume it with the same "
                         "--lora-* flags, or use another --output")
    if is_lora(model) and not adapter:
        raise ValueError(f"{checkpoint} holds full weights (a run without --lora-r): resume it without "
                         "--lora-r, or use another --output")
    if adapter:
        try:
            check_adapter_matches(model, checkpoint)
        except ValueError as err:
            raise ValueError(f"{err}: resume it with the same --lora-r, --lora-alpha and --lora-target, "
                             "or use another --output") from err


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


def full_path_forward(model, unwrapped, inputs: dict[str, Any], train: bool):
    """The same batch down the full-detail path: the same weights with the pyramid taken off, in the
    model's mode (training-time dropout applies to both paths). With ``train`` it keeps its graph and
    its LM loss (the sandwich rule's widest path); without, it runs under no_grad, a teacher only."""
    if not train:
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    with torch.set_grad_enabled(train and torch.is_grad_enabled()), pyramid_disabled(unwrapped):
        return model(**inputs, use_cache=False)


def distillation_loss(outputs, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(full path || pyramid) of the next-token distributions at the supervised positions, the
    teacher's ``teacher_logits`` coming from ``full_path_forward`` on the batch whose ``labels`` these
    are. Answers are text, never pooled, so the pyramid's shortened layout lists them in the same order."""
    teacher = teacher_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    student = outputs["logits"][:, :-1][outputs["labels"][:, 1:] != IGNORE_INDEX]
    if student.shape[0] == 0:  # no answer token in the batch (cut by max_length): nothing to match
        return outputs["logits"].sum() * 0
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: {student.shape[0]} supervised tokens with the pyramid, {teacher.shape[0]} without")
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


def routing_stats(routing, routing_loss: torch.Tensor | None,
                  difficulties: list[str | None] | None = None) -> dict[str, float]:
    """Scalars to log for one batch: per stage, the share of each expert drawn and the routers'
    entropy (normalised: 1 = uniform, 0 = certain); per stage and sample difficulty (when the data
    tags one), the share of samples whose router ranks each expert first (what inference would
    pick: batch-level shares can sit near a uniform split and hide it); kept tokens, FLOPs ratio."""
    stats: dict[str, float] = {"flops_ratio": float(routing.flops_ratio.mean())}
    routed_any = routing.experts >= 0
    for stage in range(routing.experts.shape[1]):
        routed = routed_any[:, stage]
        chosen = routing.experts[:, stage][routed]
        probs = routing.router_probs[stage][routed].float()
        experts = probs.shape[1]
        if experts == 0:  # a strategy without experts (FastV, PyramidDrop, DART): nothing routed to log
            continue
        for expert in range(experts):
            stats[f"stage{stage}_expert{expert}"] = float((chosen == expert).float().mean()) if chosen.numel() else 0.0
        if chosen.numel() and experts > 1:
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(1) / math.log(experts)
            stats[f"stage{stage}_entropy"] = float(entropy.mean())
        if difficulties is None:
            continue
        top = routing.router_probs[stage].argmax(1).tolist()
        routed_list = routed.tolist()
        for difficulty in sorted({d for d in difficulties if d}):
            tops = [top[b] for b, d in enumerate(difficulties) if d == difficulty and routed_list[b]]
            for expert in range(experts):
                if tops:
                    stats[f"stage{stage}_{difficulty}_top{expert}"] = tops.count(expert) / len(tops)
    with_images = routing.visual_tokens[:, 0] > 0
    if bool(with_images.any()):
        stats["kept_visual_tokens"] = float(routing.visual_tokens[with_images, -1].float().mean())
    if routing_loss is not None:
        stats["routing_loss"] = float(routing_loss.detach())
    return stats


# The alias a field's flag also answers to, beside ``--field_name`` and ``--field-name``: the short
# flags ``dpn train`` had before it took every TrainingArguments field (docs and scripts use them).
ALIASES = {
    "router_learning_rate": "--router-lr",
    "output_dir": "--output",
    "max_steps": "--steps",
    "per_device_train_batch_size": "--batch-size",
    "learning_rate": "--lr",
    "gradient_accumulation_steps": "--grad-accum",
}


def _help(text: str, field_name: str | None = None) -> dict[str, Any]:
    """A field's ``metadata``: help text, and the field's alias flag if it has one."""
    metadata: dict[str, Any] = {"help": text}
    if field_name in ALIASES:
        metadata["aliases"] = [ALIASES[field_name]]
    return metadata


def _ours(field_name: str, text: str, default: str = "%(default)s") -> dict[str, Any]:
    """``metadata`` of a TrainingArguments field whose default is dpn's, not the Trainer's."""
    trainers = TrainingArguments.__dataclass_fields__[field_name].default
    return _help(f"{text} (default: {default}, dpn's; the Trainer's: {trainers})", field_name)


@dataclass
class TrainOptions:
    """dpn's own options of ``train``; the Trainer's are ``PyramidTrainingArguments``."""

    _argument_group_name = "dpn options"

    data: str = field(metadata=_help("LLaVA-format JSON file (required)"))
    image_folder: str | None = field(
        default=None, metadata=_help("folder the JSON's image paths are relative to (default: the JSON's folder)"))
    pyramid: str = field(default="paper", metadata=_help(f"pyramid to train with: {presets.spec_help()}"))
    positions: str | None = field(default=None, metadata=_help(
        f"position mode of the pyramid's tokens, one of {POSITION_MODES} (default: the pyramid's own)"))
    init_from: str | None = field(
        default=None, metadata=_help("checkpoint to fine-tune (default: a fresh tiny LLaVA from --seed)"))
    freeze_vision: bool = field(default=False, metadata=_help("do not train the vision tower"))
    router_learning_rate: float | None = field(
        default=None, metadata=_help("the routers' learning rate (default: --learning_rate)", "router_learning_rate"))
    lora_r: int | None = field(default=None, metadata=_help(
        "train rank-R LoRA adapters on the language model's projections, and the routers, with every other "
        "weight frozen; the output is the merged model, the adapter goes to OUTPUT/lora; needs peft "
        "(default: no LoRA, every weight trains)"))
    lora_target: list[str] | None = field(default=None, metadata=_help(
        f"with --lora-r: the language model's modules to adapt, by name (default: {' '.join(DEFAULT_LORA_TARGETS)})"))
    lora_alpha: float | None = field(default=None, metadata=_help("with --lora-r: LoRA's alpha (default: 2 R)"))
    lora_dropout: float | None = field(
        default=None, metadata=_help("with --lora-r: dropout on the adapters' input, in [0, 1) (default: 0)"))
    distill_weight: float = field(default=0.0, metadata=_help(
        "add this weight x KL(vanilla || pyramid) on the answer tokens, the vanilla model being the same "
        "weights with the pyramid off (one more forward per step; default: 0, no distillation)"))
    full_path_weight: float = field(default=0.0, metadata=_help(
        "also train the full-detail path (the same weights with the pyramid off) on every batch, with this "
        "weight x its LM loss beside the drawn path's: the sandwich rule of slimmable networks (Yu & Huang, "
        "2019); with --distill-weight the drawn path is distilled from it. One more forward and backward per "
        "step (default: 0, only the drawn path trains)"))
    router_fit_samples: int = field(default=DEFAULT_ROUTER_FIT_SAMPLES, metadata=_help(
        "with a pyramid whose routers are fitted after training (--pyramid fitted): how many training samples "
        "they are fitted on (each runs once per routing path)"))
    max_length: int = field(default=2048, metadata=_help("longest tokenised sample"))
    limit: int | None = field(default=None, metadata=_help("use only the first N samples (default: all)"))
    progress: bool = field(
        default=True, metadata=_help("print progress; --no_progress also hides the Trainer's progress bars"))


def launched_processes() -> int:
    """How many processes a distributed launcher (torchrun, accelerate launch) started, 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _on_gpu(args: TrainingArguments) -> bool:
    return torch.cuda.is_available() and not args.use_cpu


@dataclass
class PyramidTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with dpn's defaults (``dpn train --help`` shows them beside the Trainer's).

    Every field stays a flag of ``dpn train`` and an argument here; only the defaults differ, and an
    explicit value (flag or argument) always wins.
    ``output_dir`` is required. ``bf16`` and ``dataloader_pin_memory`` default to ``None``: on when
    training on a CUDA GPU (that supports bf16; not with ``fp16``), off otherwise.
    """

    _argument_group_name = "Trainer options (transformers.TrainingArguments)"

    output_dir: str = field(
        metadata=_help("output directory (required); training resumes from its last checkpoint", "output_dir"))
    max_steps: int = field(default=500, metadata=_ours("max_steps", "optimizer steps (overrides num_train_epochs)"))
    per_device_train_batch_size: int = field(
        default=32, metadata=_ours("per_device_train_batch_size", "batch size per device"))
    gradient_accumulation_steps: int = field(  # redeclared for its alias only
        default=1, metadata=_help("batches accumulated per optimizer step", "gradient_accumulation_steps"))
    learning_rate: float = field(default=5e-4, metadata=_ours("learning_rate", "peak learning rate"))
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata=_ours("lr_scheduler_type", "learning rate schedule"))
    warmup_steps: float = field(
        default=50, metadata=_ours("warmup_steps", "linear warm-up steps (a float in [0, 1): a share of max_steps)"))
    adam_beta2: float = field(default=0.98, metadata=_ours("adam_beta2", "Adam's second-moment decay"))
    weight_decay: float = field(
        default=0.0, metadata=_ours("weight_decay", "weight decay (never on biases, norms or the routers)"))
    max_grad_norm: float = field(default=1.0, metadata=_ours("max_grad_norm", "gradient clipping norm (0: none)"))
    bf16: bool | None = field(default=None, metadata=_ours(
        "bf16", "bf16 mixed precision", "on when training on a CUDA GPU that supports bf16, unless --fp16"))
    logging_steps: float = field(default=10, metadata=_ours("logging_steps", "log every N steps"))
    report_to: None | str | list[str] = field(default="none", metadata=_ours(
        "report_to", "integrations to report to: wandb, tensorboard, ..., all or none"))
    save_only_model: bool = field(default=False, metadata=_ours(
        "save_only_model", "checkpoints without optimizer, scheduler and RNG states (a run cannot resume)"))
    save_steps: float = field(default=100, metadata=_ours("save_steps", "checkpoint every N steps"))
    save_total_limit: int | None = field(default=2, metadata=_ours("save_total_limit", "checkpoints kept"))
    seed: int = field(default=0, metadata=_ours("seed", "random seed (data order, routers, a fresh tiny model)"))
    dataloader_num_workers: int = field(
        default=0, metadata=_ours("dataloader_num_workers", "data loader worker processes"))
    dataloader_pin_memory: bool | None = field(default=None, metadata=_ours(
        "dataloader_pin_memory", "pin batches in memory", "on when training on a CUDA GPU"))
    remove_unused_columns: bool = field(default=False, metadata=_ours(
        "remove_unused_columns", "drop dataset columns the model's forward does not take"))

    def __post_init__(self) -> None:
        if launched_processes() > 1 and not torch.cuda.is_available() and not self.use_cpu:
            # torchrun / accelerate launch on a machine without CUDA: the Trainer sets up CPU DDP (gloo)
            # only with use_cpu; otherwise every process would train alone into the same folder.
            self.use_cpu = True
        if not self.output_dir:
            raise ValueError("output_dir is required (--output_dir / --output): where checkpoints and the model go")
        if self.bf16 is None:
            self.bf16 = _on_gpu(self) and not self.fp16 and torch.cuda.is_bf16_supported()
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = _on_gpu(self)
        super().__post_init__()


def train_parser() -> HfArgumentParser:
    """The parser of ``dpn train``: one flag per field of ``TrainOptions`` and ``PyramidTrainingArguments``."""
    parser = HfArgumentParser(
        (TrainOptions, PyramidTrainingArguments), prog="dpn train",
        usage="dpn train --data JSON --output DIR [--pyramid SPEC] [--init-from DIR] [any TrainingArguments flag ...]",
        description="Train or fine-tune a model (LLaVA, LLaVA-NeXT / OneVision, Qwen2-VL / 2.5-VL), with or "
                    "without a pyramid, with PyramidTrainer. "
                    "Running the same command again resumes from the last checkpoint in --output.",
    )
    for action in parser._actions:
        # HfArgumentParser gives optional booleans (``bool | None``) a required value; let a bare
        # ``--bf16`` / ``--gradient_checkpointing`` mean true, as it does for plain booleans.
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"set --{action.dest} to false%(default).0s"  # not a copy of --{dest}'s help
        if action.required:
            action.default = argparse.SUPPRESS  # no "(default: None)" in the help
        elif action.help and "(default: " in action.help and "%(default)" not in action.help:
            action.help += "%(default).0s"  # says its default in words: no "(default: None)" after it
    return parser


def parse_train_args(argv: list[str] | None = None) -> tuple[TrainOptions, PyramidTrainingArguments]:
    """``dpn train``'s flags as the arguments of ``train``; a bad flag exits with status 2 and a message."""
    parser = train_parser()
    try:
        options, args, unknown = parser.parse_args_into_dataclasses(
            args=sys.argv[1:] if argv is None else list(argv), return_remaining_strings=True, look_for_args_file=False)
    except ValueError as error:  # TrainingArguments' own checks
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return options, args


def _flag(name: str) -> str:
    return ALIASES.get(name, f"--{name}")


def check_train_options(options: TrainOptions, args: TrainingArguments) -> None:
    """Numbers a run cannot use, each named by its flag (before anything is loaded)."""
    at_least_one = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_length": options.max_length,
        "limit": options.limit,
        "router_fit_samples": options.router_fit_samples,
    }
    problems = [f"{_flag(name)} must be at least 1, got {value}" for name, value in at_least_one.items()
                if value is not None and value < 1]
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"{_flag('max_steps')} must be a positive number of optimizer steps (or -1: train "
                        f"--num_train_epochs epochs), got {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        problems.append(f"--num_train_epochs must be positive with {_flag('max_steps')} -1, got {args.num_train_epochs}")
    positive = {"learning_rate": args.learning_rate, "router_learning_rate": options.router_learning_rate,
                "save_steps": args.save_steps, "logging_steps": args.logging_steps}
    problems += [f"{_flag(name)} must be a positive number, got {value}" for name, value in positive.items()
                 if value is not None and not (math.isfinite(value) and value > 0)]
    if not (math.isfinite(args.warmup_steps) and args.warmup_steps >= 0):
        problems.append(f"--warmup_steps must be at least 0, got {args.warmup_steps}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        problems.append(f"{_flag('output_dir')} {args.output_dir} is a file; give a directory")
    problems += [f"--{name} must be a number >= 0, got {value}"
                 for name, value in (("distill_weight", options.distill_weight),
                                     ("full_path_weight", options.full_path_weight))
                 if not (math.isfinite(value) and value >= 0)]
    if options.full_path_weight and args.gradient_checkpointing:
        problems.append("--full_path_weight runs the full-detail path with the pyramid taken off; gradient "
                        "checkpointing would recompute it with the pyramid on: drop --activation_checkpointing "
                        "(--gradient_checkpointing)")
    if options.positions is not None and options.positions not in POSITION_MODES:
        problems.append(f"--positions must be one of {POSITION_MODES}, got {options.positions!r}")
    problems += _lora_problems(options, args)
    if problems:
        raise ValueError("; ".join(problems))


LORA_FLAGS = {"lora_target": "--lora-target", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout"}


def _lora_problems(options: TrainOptions, args: TrainingArguments) -> list[str]:
    if options.lora_r is None:
        given = [flag for name, flag in LORA_FLAGS.items() if getattr(options, name) is not None]
        return [f"{' '.join(given)} set LoRA up: give --lora-r too (LoRA's rank)"] if given else []
    problems = []
    if isinstance(options.lora_r, bool) or not isinstance(options.lora_r, int):
        problems.append(f"--lora-r must be a whole number, got {options.lora_r!r}")
    elif options.lora_r < 1:
        problems.append(f"--lora-r must be at least 1, got {options.lora_r}")
    if options.lora_alpha is not None and not (math.isfinite(options.lora_alpha) and options.lora_alpha > 0):
        problems.append(f"--lora-alpha must be a positive number, got {options.lora_alpha}")
    if options.lora_dropout is not None and not (math.isfinite(options.lora_dropout) and 0 <= options.lora_dropout < 1):
        problems.append(f"--lora-dropout must be in [0, 1), got {options.lora_dropout}")
    if options.lora_target is not None and not options.lora_target:
        problems.append("--lora-target needs at least one module name")
    if args.fsdp or args.deepspeed:
        problems.append("--lora-r does not work with --fsdp or --deepspeed (the merged model is written from one "
                        "process's full weights); train LoRA on one process or with DDP (torchrun)")
    if importlib.util.find_spec("peft") is None:
        problems.append("--lora-r needs peft: pip install 'dpn[lora]'")
    return problems


def build_model(options: TrainOptions, seed: int = 0):
    """The model and processor to train: ``init_from`` checkpoint, or a fresh tiny LLaVA from ``seed``;
    with ``lora_r``, wrapped by ``add_lora`` (only the adapters and the routers train)."""
    from dpn.lab.families import zoo

    if options.init_from:
        model, processor = zoo.load(options.init_from)
    else:
        model, processor = zoo.build_tiny(seed=seed)
    pyramid = pyramid_from_spec(options.pyramid, model, processor.tokenizer)
    if pyramid is not None:
        if options.positions is not None:
            pyramid = replace(pyramid, positions=options.positions)
        apply_pyramid(model, pyramid)
    if options.freeze_vision:
        for parameter in model.get_encoder(modality="image").parameters():
            parameter.requires_grad_(False)
    if options.lora_r is not None:  # after the pyramid: add_lora keeps its routers trainable
        targets = tuple(options.lora_target or DEFAULT_LORA_TARGETS)
        try:
            model = add_lora(model, options.lora_r, targets, alpha=options.lora_alpha,
                             dropout=options.lora_dropout or 0.0)
        except ValueError as err:  # a target peft cannot adapt (or that matches nothing), named by its flag
            raise ValueError(f"--lora-target {' '.join(targets)}: {err}") from err
    return model, processor


def fit_routers_after_training(trainer: Trainer, dataset: LlavaDataset, options: TrainOptions,
                               args: TrainingArguments) -> FitReport | None:
    """Fit the routers of a ``router_training="fit"`` pyramid (``dpn.router_fit``) on the first
    ``options.router_fit_samples`` training samples; None for any other model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = model.get_base_model() if is_lora(model) else model  # the pyramid sits on the base model
    if not has_pyramid(model) or getattr(get_pyramid(model).strategy_config, "router_training", None) != "fit":
        return None
    collate = trainer.data_collator
    count = min(options.router_fit_samples, len(dataset))
    device = next(model.parameters()).device

    def batches():
        starts = range(0, count, args.per_device_train_batch_size)
        for start in tqdm(starts, desc="fitting the routers (every path of each sample)", disable=not options.progress):
            batch = collate([dataset[i] for i in range(start, min(start + args.per_device_train_batch_size, count))])
            yield {k: v.to(device) for k, v in batch.items() if k != DIFFICULTY}

    report = fit_routers(model, batches(), get_pyramid(model).strategy_config.fit_flops_weight, seed=args.seed)
    if options.progress:
        shares = "; ".join(f"stage {s}: " + " / ".join(f"{share:.0%}" for share in stage)
                           for s, stage in enumerate(report.target_shares))
        print(f"routers fitted on {report.samples} samples; cheapest expert shares {shares}", file=sys.stderr)
    return report


def train(options: TrainOptions, args: PyramidTrainingArguments,
          callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train (or resume training) and write the final model, processor and pyramid to ``args.output_dir``
    (after LoRA: the merged model, and the adapter with the routers in ``output_dir/lora``).

    ``args`` is used as given (``PyramidTrainingArguments`` holds dpn's defaults; any
    ``TrainingArguments`` works), except that ``options.progress=False`` also sets ``disable_tqdm``.
    """
    output_dir = Path(args.output_dir)
    check_train_options(options, args)
    if is_finished(output_dir, args.max_steps, args.num_train_epochs):
        print(f"{output_dir} holds a finished run ({finished_run(output_dir).get('global_step')} steps); nothing to "
              "do (ask for more steps to continue it, or use another --output)", file=sys.stderr)
        return output_dir
    if not options.progress and not args.disable_tqdm:
        args = copy.copy(args)  # the caller's arguments stay as they were
        args.disable_tqdm = True
    set_seed(args.seed)  # before the routers are created, so that --seed fixes them too
    model, processor = build_model(options, seed=args.seed)
    images = family_images(model.config, processor)
    dataset = LlavaDataset(
        options.data, options.image_folder, images, max_length=options.max_length, limit=options.limit,
        router_token=prompt_router_token(model, processor.tokenizer),
    )
    dataset.check(progress=options.progress)
    trainer = PyramidTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id, images=images),
        processing_class=processor,
        router_learning_rate=options.router_learning_rate,
        distill_weight=options.distill_weight,
        full_path_weight=options.full_path_weight,
        callbacks=callbacks,
    )
    last, incomplete = last_complete_checkpoint(output_dir)
    for checkpoint in incomplete:
        print(f"skipping {checkpoint}: incomplete (no readable trainer_state.json or no weights; the run "
              "stopped while writing it, or files were removed)", file=sys.stderr)
    if last is not None:
        print(f"resuming from {last}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=last)
    fit = fit_routers_after_training(trainer, dataset, options, args)
    if fit is not None and trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / ROUTER_FIT_RECORD).write_text(json.dumps(asdict(fit), indent=1))
    if is_lora(trainer.model):
        trainer.save_model(str(output_dir / LORA_FOLDER))  # the adapter and the routers, as in a checkpoint
        trainer.model = merged(trainer.model)  # then the plain model with its pyramid, as a full run writes it
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():  # one writer under DDP, as for the Trainer's own files
        record = {"options": asdict(options), "training_args": args.to_dict(), "global_step": trainer.state.global_step}
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        (output_dir / RUN_RECORD).write_text(json.dumps(record, indent=1, default=str))  # last: "finished"
    return output_dir
