"""Evaluation: accuracy and efficiency of a model (with or without a pyramid) on LLaVA-format data.

For each test sample the model answers greedily; the answer is compared with the reference after
normalisation (lower case, punctuation and articles dropped). Alongside accuracy (overall and per
``difficulty`` / ``family`` tag) it records what the pyramid did: the expert per stage, visual
tokens kept per stage, and the LLM prefill FLOPs ratio to the vanilla model. It also measures the
prefill latency of the same batches with and without the pyramid.

Predictions are appended to ``predictions.jsonl`` as they are made; an interrupted evaluation
picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpn.api import apply_pyramid, get_pyramid, has_pyramid, pyramid_disabled, remove_pyramid
from dpn.budget import calibrate_router_bias, set_probability_scale, set_router_bias
from dpn.models import geometry_of
from dpn.lab.families import FamilyImages
from dpn.lab.data.llava import LlavaDataset
from dpn.lab.engine.answering import Answer, Answerer, Prepared
from dpn.lab.engine.loading import load_model
from dpn.lab.engine.run_identity import claim, file_hash, weights_fingerprint
from dpn.lab.engine.timing import paired_medians, prefill_forward

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
PLOT = "routing.png"
RESULTS = [PREDICTIONS, SUMMARY, PLOT]
ARTICLES = {"a", "an", "the"}
LATENCY_BATCHES = 4  # batches timed for the latency ratio, by default
LATENCY_REPEATS = 5


def normalize_answer(text: str) -> str:
    words = re.sub(r"[^0-9a-z ]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


@dataclass
class EvalOptions:
    model: str
    data: str
    output_dir: str
    image_folder: str | None = None
    pyramid: str = "saved"  # saved, or a spec of PyramidConfig.from_spec
    batch_size: int = 32
    max_new_tokens: int = 8
    limit: int | None = None
    router_bias: float | None = None  # DPN only: set the budget knob directly
    budget: float | None = None  # DPN only: calibrate the router bias to this LLM FLOPs fraction
    calibration_data: str | None = None  # samples for the calibration (default: the evaluated data)
    calibration_samples: int = 128
    probability_scale: str | None = None  # DPN only: override the saved probability_scale (e.g. train_only)
    force_experts: list[int] | None = None  # pooling pyramids: one expert per stage for every sample (-1: routed)
    positions: str | None = None  # re-apply the pyramid with this position mode (its weights and settings kept)
    measure_latency: bool = True
    latency_batches: int = LATENCY_BATCHES  # the first N batches are timed with and without the pyramid
    plot: bool = True
    progress: bool = True
    overwrite: bool = False  # results of another run in output_dir are deleted instead of refused

    def __post_init__(self) -> None:
        at_least_one = {"batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens, "limit": self.limit,
                        "calibration_samples": self.calibration_samples, "latency_batches": self.latency_batches}
        problems = [f"--{name.replace('_', '-')} must be at least 1, got {value}"
                    for name, value in at_least_one.items() if value is not None and value < 1]
        if self.budget is not None and not 0 < self.budget <= 1:
            problems.append(f"--budget is a fraction of the vanilla FLOPs in (0, 1], got {self.budget}")
        if self.router_bias is not None and not math.isfinite(self.router_bias):
            problems.append(f"--router-bias must be a finite number, got {self.router_bias}")
        if problems:
            raise ValueError("; ".join(problems))


def with_positions(model, positions: str) -> None:
    """Re-apply ``model``'s pyramid with position mode ``positions``, keeping its weights and
    inference settings (how positions follow pooled tokens changes no weight)."""
    if not has_pyramid(model):
        raise ValueError("--positions needs a model with a pyramid (saved or --pyramid)")
    pyramid = get_pyramid(model)
    state, inference = pyramid.state_dict(), pyramid.inference_state()
    config = replace(pyramid.config, positions=positions)  # checked by PyramidConfig
    config.validate_for(geometry_of(model))  # and for the family, before the model loses its pyramid
    remove_pyramid(model)
    apply_pyramid(model, config)
    get_pyramid(model).load_state_dict(state)
    get_pyramid(model).load_inference_state(inference)


def _forced_experts(options: EvalOptions, model) -> dict[str, list[int]]:
    """The ``force_experts`` argument of every prefill ({} when not forcing), checked up front."""
    if options.force_experts is None:
        return {}
    if not has_pyramid(model):
        raise ValueError("--force-experts needs a model with a pooling pyramid (saved or --pyramid)")
    strategy = get_pyramid(model)
    stages = len(strategy.config.stages)
    if len(options.force_experts) != stages:
        raise ValueError(f"--force-experts takes one expert per stage: the pyramid has {stages} stages, got "
                         f"{len(options.force_experts)}")
    for stage, expert in enumerate(options.force_experts):
        choices = strategy.num_choices(stage)
        if choices == 0:
            raise ValueError(f"--force-experts applies to pooling pyramids; {strategy.strategy_config.name} has no experts")
        if not -1 <= expert < choices:
            raise ValueError(f"--force-experts: stage {stage} has experts 0..{choices - 1} (-1: its router decides), "
                             f"got {expert}")
    return {"force_experts": list(options.force_experts)}


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Evaluate, write ``predictions.jsonl``, ``summary.json`` and plots; return the summary."""
    output_dir = Path(options.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output {output_dir} is a file; give a directory")
    model, processor = load_model(options.model, options.pyramid)
    if options.positions is not None:
        with_positions(model, options.positions)
    forced = _forced_experts(options, model)
    device = next(model.parameters()).device
    answerer = Answerer(model, processor)
    images, router_token, collate = answerer.images, answerer.router_token, answerer.collate
    dataset = LlavaDataset(options.data, options.image_folder, images, for_generation=True, limit=options.limit,
                           router_token=router_token)
    dataset.check(progress=options.progress)
    claim(output_dir, _identity(options, model, dataset), RESULTS, options.overwrite)
    if options.probability_scale is not None:
        set_probability_scale(model, options.probability_scale)
    calibration = _apply_budget(options, model, images, collate, device, router_token)

    predictions_path = output_dir / PREDICTIONS
    done = _read_predictions(predictions_path)
    todo = [i for i, record in enumerate(dataset.records) if _record_id(record, i) not in done]
    latency = {"pyramid": [], "vanilla": []}
    batches = range(0, len(todo), options.batch_size)
    with predictions_path.open("a") as sink:
        for number, start in enumerate(tqdm(batches, desc="evaluating", disable=not options.progress)):
            indices = todo[start:start + options.batch_size]
            samples = [dataset[i] for i in indices]
            answers = answerer.answer([Prepared.encoded(sample, options.max_new_tokens) for sample in samples], **forced)
            if options.measure_latency and has_pyramid(model) and number < options.latency_batches:
                batch = {k: v.to(device) for k, v in collate(samples).items()}
                vanilla, pyramid = paired_medians(
                    lambda: _without_pyramid(model, batch), lambda: prefill_forward(model, batch, **forced),
                    repeats=LATENCY_REPEATS, warmup=1, device=device,
                )
                latency["vanilla"].append(vanilla)
                latency["pyramid"].append(pyramid)
            for index, answer in zip(indices, answers):
                result = _result(dataset.records[index], index, answer)
                sink.write(json.dumps(result) + "\n")
                done[result["id"]] = result
            sink.flush()

    results = [done[_record_id(r, i)] for i, r in enumerate(dataset.records) if _record_id(r, i) in done]
    summary = summarize(results)
    summary["model"] = options.model
    summary["pyramid"] = get_pyramid(model).config.to_dict() if has_pyramid(model) else None
    if has_pyramid(model) and get_pyramid(model).inference_state():  # settings on the module, not in its config
        summary["inference"] = get_pyramid(model).inference_state()
    if calibration is not None:
        summary["calibration"] = calibration
    if latency["pyramid"]:
        summary["prefill_latency_ratio"] = sum(latency["pyramid"]) / sum(latency["vanilla"])
        summary["prefill_seconds_per_batch"] = {k: statistics.median(v) for k, v in latency.items()}
        summary["latency_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    if options.plot:
        plot_routing(results, output_dir / PLOT)
    return summary


def _apply_budget(options: EvalOptions, model, images: FamilyImages, collate, device,
                  router_token: str | None) -> dict[str, float] | None:
    """Set the DPN router bias from ``router_bias`` or by calibrating it to ``budget``."""
    if options.router_bias is None and options.budget is None:
        return None
    if not has_pyramid(model):
        raise ValueError("--budget and --router-bias need a model with a DPN pyramid")
    if options.budget is None:
        set_router_bias(model, options.router_bias)
        return None
    calibration_set = LlavaDataset(options.calibration_data or options.data, options.image_folder, images,
                                   for_generation=True, limit=options.calibration_samples, router_token=router_token)
    samples = [calibration_set[i] for i in range(len(calibration_set))]
    batches = [
        {k: v.to(device) for k, v in collate(samples[i:i + options.batch_size]).items()}
        for i in range(0, len(samples), options.batch_size)
    ]
    bias, ratio = calibrate_router_bias(model, batches, options.budget, progress=options.progress)
    return {"target": options.budget, "router_bias": bias, "flops_ratio": ratio, "samples": len(samples)}


def _identity(options: EvalOptions, model, dataset: LlavaDataset) -> dict[str, Any]:
    """What makes this run's predictions what they are (``--limit`` and ``--batch-size`` do not)."""
    pyramid = get_pyramid(model) if has_pyramid(model) else None
    return {
        "model": str(Path(options.model).resolve()),
        "weights": weights_fingerprint(options.model),
        "pyramid": pyramid.config.to_dict() if pyramid is not None else None,
        "inference": {"router_bias": options.router_bias, "budget": options.budget,
                      "calibration_data": options.calibration_data, "calibration_samples": options.calibration_samples,
                      "probability_scale": options.probability_scale, "force_experts": options.force_experts,
                      "positions": options.positions},
        "data": str(Path(options.data).resolve()),
        "data_sha256": file_hash(options.data),
        "image_folder": str(dataset.image_folder.resolve()),
        "max_new_tokens": options.max_new_tokens,
    }


def _without_pyramid(model, batch) -> None:
    with pyramid_disabled(model):
        prefill_forward(model, batch)


def _record_id(record: dict, index: int) -> str:
    return str(record.get("id", index))


def _read_predictions(path: Path) -> dict[str, dict]:
    """Results already written; a line cut short by an interruption is dropped (and re-evaluated)."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    complete = []
    for line in path.read_text().splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[result["id"]] = result
        complete.append(line)
    path.write_text("".join(f"{line}\n" for line in complete))
    return done


def _result(record: dict, index: int, answer: Answer) -> dict[str, Any]:
    reference = record["conversations"][-1]["value"] if record["conversations"][-1]["from"] in ("gpt", "assistant") else ""
    result = {
        "id": _record_id(record, index),
        "difficulty": record.get("difficulty", "all"),
        "family": record.get("family", "all"),
        "prediction": answer.text,
        "reference": reference,
        "correct": normalize_answer(answer.text) == normalize_answer(reference),
    }
    if answer.experts is not None:  # a pyramid: a text-only sample keeps no visual token at any stage, at FLOPs 1
        result["experts"] = answer.experts
        result["visual_tokens"] = answer.visual_tokens or [0] * (len(answer.experts) + 1)
        result["flops_ratio"] = answer.flops_ratio
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, kept visual tokens and FLOPs ratio, overall and per difficulty and family."""
    def stats(group: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(group), "accuracy": sum(r["correct"] for r in group) / max(1, len(group))}
        routed = [r for r in group if "visual_tokens" in r]
        if routed:
            stages = len(routed[0]["visual_tokens"])
            out["visual_tokens"] = [statistics.mean(r["visual_tokens"][s] for r in routed) for s in range(stages)]
            out["flops_ratio"] = statistics.mean(r["flops_ratio"] for r in routed)
        return out

    by_difficulty, by_family = defaultdict(list), defaultdict(list)
    for result in results:
        by_difficulty[result["difficulty"]].append(result)
        by_family[result["family"]].append(result)
    return {
        "overall": stats(results),
        "difficulty": {k: stats(v) for k, v in sorted(by_difficulty.items())},
        "family": {k: stats(v) for k, v in sorted(by_family.items())},
    }


def plot_routing(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Bar charts of each stage's expert shares per difficulty."""
    routed = [r for r in results if "experts" in r]
    if not routed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = len(routed[0]["experts"])
    difficulties = sorted({r["difficulty"] for r in routed})
    experts = sorted({e for r in routed for e in r["experts"] if e >= 0}) or [0]
    figure, axes = plt.subplots(1, stages, figsize=(4 * stages, 3.2), squeeze=False)
    width = 0.8 / len(difficulties)
    for stage in range(stages):
        axis = axes[0][stage]
        for k, difficulty in enumerate(difficulties):
            chosen = [r["experts"][stage] for r in routed if r["difficulty"] == difficulty and r["experts"][stage] >= 0]
            shares = [chosen.count(e) / max(1, len(chosen)) for e in experts]
            axis.bar([e + k * width for e in experts], shares, width=width, label=difficulty)
        axis.set_title(f"stage {stage}")
        axis.set_xticks([e + 0.4 - width / 2 for e in experts], [f"expert {e}" for e in experts])
        axis.set_ylim(0, 1)
        axis.set_ylabel("share of samples")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
