"""``dpn paths``: every routing path of a pooling pyramid, forced, and the oracle frontier it allows.

For a model and its pooling pyramid (saved, or a ``--pyramid`` spec), each path (one expert per
stage, every sample forced onto it) is evaluated in each asked position mode (``renumber`` /
``keep``) and, for a DPN, each probability-scale mode (``value``: pooled tokens times the router's
probability of the forced expert; ``none``: unscaled). Each evaluation is a normal ``dpn eval``
run in its own folder (resumable).

From the per-sample answers it computes the **oracle frontier**: at each price ``w`` of a unit of
FLOPs ratio in accuracy, every sample takes the path that maximises ``correct - w x FLOPs`` (the
best any router could do with these paths). That oracle also knows which answers happen to come out
right on a path, so it overstates what a router can reach; the **difficulty oracle** sends every
question of a difficulty down the same path (the one best for that difficulty on average): the best
a router could do that reads only how hard the question is. With a DPN, the routers' own choices are
evaluated too and their **regret** is each oracle's accuracy at no more FLOPs minus theirs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpn.api import get_pyramid
from dpn.lab.engine.loading import load_model
from dpn.lab.evaluate import PREDICTIONS, EvalOptions, evaluate
from dpn.router_fit import all_paths

POSITION_MODES = ("renumber", "keep")
SCALE_MODES = ("none", "value")
DIFFICULTIES = ("easy", "medium", "hard")
# Prices of FLOPs (accuracy points per unit of FLOPs ratio) at which the oracle chooses its paths.
ORACLE_PRICES = tuple(round(0.02 * k, 2) for k in range(51)) + (1.5, 2.0, 3.0, 5.0, 100.0)
ROUTED = "routed"
# FLOPs ratios are float32 means on one side and Python means of them on the other: equal within this.
FLOPS_TOLERANCE = 1e-6


@dataclass
class PathsOptions:
    model: str
    data: str
    output_dir: str
    pyramid: str = "saved"
    positions: list[str] = field(default_factory=lambda: ["keep"])
    scales: list[str] = field(default_factory=lambda: ["none"])
    limit: int | None = None
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        problems = [f"--positions takes {POSITION_MODES}, got {p!r}" for p in self.positions if p not in POSITION_MODES]
        problems += [f"--scale takes {SCALE_MODES}, got {s!r}" for s in self.scales if s not in SCALE_MODES]
        if not self.positions or not self.scales:
            problems.append("give at least one position mode and one scale mode")
        if problems:
            raise ValueError("; ".join(problems))


def _label(path: tuple[int, ...]) -> str:
    return "-".join(map(str, path))


def run_paths(options: PathsOptions) -> dict[str, Any]:
    """Evaluate every path in every asked mode; write ``paths.json``, ``PATHS.md`` and ``paths.png``."""
    model, _ = load_model(options.model, options.pyramid)
    paths = all_paths(model)  # checks that the pyramid pools (a ValueError names the strategy otherwise)
    has_routers = hasattr(get_pyramid(model), "routers")
    routed = has_routers and options.pyramid == "saved"  # trained routers whose choices are worth judging
    if "value" in options.scales and not has_routers:
        raise ValueError("--scale value scales pooled tokens by a DPN router's probability; this pyramid has no routers")
    out = Path(options.output_dir)
    combinations = [(positions, scale) for positions in options.positions for scale in options.scales]
    bar = tqdm(total=len(combinations) * (len(paths) + routed), desc="evaluating paths", disable=not options.progress)
    modes = []
    for positions, scale in combinations:
        folder = out / f"{positions}-{scale}"
        scaling = scale if has_routers else None  # only a DPN has a probability to scale by
        runs = {}
        for path in paths:
            runs[_label(path)] = _evaluate(options, folder / _label(path), positions, scaling, list(path))
            bar.update()
        router = None
        if routed:
            router = _evaluate(options, folder / ROUTED, positions, scaling, None)
            bar.update()
        modes.append(summarise_mode(f"{positions}, scale {scale}", folder, paths, runs, router))
    bar.close()
    report = {"options": asdict(options), "paths": [list(p) for p in paths], "modes": modes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "paths.json").write_text(json.dumps(report, indent=1))
    plot_paths(report, out / "paths.png")
    (out / "PATHS.md").write_text(paths_page(report))
    return report


def _evaluate(options: PathsOptions, folder: Path, positions: str, scale: str | None, forced: list[int] | None) -> dict:
    return evaluate(EvalOptions(
        model=options.model, data=options.data, output_dir=str(folder), pyramid=options.pyramid,
        batch_size=options.batch_size, limit=options.limit, force_experts=forced, positions=positions,
        probability_scale=scale, measure_latency=False, plot=False, progress=False,
    ))


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / PREDICTIONS).read_text().splitlines()]


def summarise_mode(mode: str, folder: Path, paths: list[tuple[int, ...]], runs: dict[str, dict],
                   router: dict | None) -> dict[str, Any]:
    """One mode's path table, oracle frontier (overall and per difficulty) and the routers' regret."""
    rows = []
    for path in paths:
        summary = runs[_label(path)]
        rows.append({"path": list(path), "flops_ratio": summary["overall"]["flops_ratio"],
                     "accuracy": summary["overall"]["accuracy"],
                     **{d: summary["difficulty"][d]["accuracy"] for d in DIFFICULTIES if d in summary["difficulty"]}})
    predictions = [_predictions(folder / _label(path)) for path in paths]
    correct = torch.tensor([[float(p["correct"]) for p in run] for run in predictions], dtype=torch.float64)
    flops = torch.tensor([[p["flops_ratio"] for p in run] for run in predictions], dtype=torch.float64)  # (paths, samples)
    difficulty = [p["difficulty"] for p in predictions[0]]
    by_price = oracle_points(correct, flops)
    frontier = efficient(by_price)
    per_difficulty = {d: oracle_frontier(correct[:, [i for i, x in enumerate(difficulty) if x == d]],
                                         flops[:, [i for i, x in enumerate(difficulty) if x == d]])
                      for d in DIFFICULTIES if d in difficulty}
    by_difficulty_path = efficient(difficulty_oracle_points(correct, flops, difficulty))
    result: dict[str, Any] = {"mode": mode, "rows": rows, "oracle": frontier, "oracle_by_price": by_price,
                              "oracle_by_difficulty": per_difficulty, "difficulty_oracle": by_difficulty_path}
    if router is not None:
        accuracy, ratio = router["overall"]["accuracy"], router["overall"]["flops_ratio"]
        result["router"] = {"accuracy": accuracy, "flops_ratio": ratio,
                            "oracle_accuracy": oracle_accuracy_at(frontier, ratio),
                            "regret": oracle_accuracy_at(frontier, ratio) - accuracy,
                            "difficulty_oracle_accuracy": oracle_accuracy_at(by_difficulty_path, ratio),
                            "difficulty_regret": oracle_accuracy_at(by_difficulty_path, ratio) - accuracy}
    return result


def oracle_points(correct: torch.Tensor, flops: torch.Tensor) -> list[dict[str, float]]:
    """Accuracy and mean FLOPs ratio when every sample takes, at each price in ``ORACLE_PRICES``,
    the path maximising correct - price x FLOPs (ties: the cheaper path). ``correct`` and ``flops``
    are (paths, samples)."""
    if correct.shape[1] == 0:
        return []
    points = []
    columns = torch.arange(correct.shape[1])
    for price in ORACLE_PRICES:
        # Among equal scores the cheaper path wins: a tiny extra price breaks the tie.
        choice = (correct - (price + 1e-6) * flops).argmax(0)
        points.append({"price": price, "accuracy": float(correct[choice, columns].mean()),
                       "flops_ratio": float(flops[choice, columns].mean())})
    return points


def difficulty_oracle_points(correct: torch.Tensor, flops: torch.Tensor, difficulty: list[str]) -> list[dict[str, float]]:
    """As ``oracle_points``, but at each price every sample of a difficulty takes the same path: the
    one whose mean correct - price x FLOPs over that difficulty's samples is highest (ties: the cheaper)."""
    if correct.shape[1] == 0:
        return []
    groups = [torch.tensor([i for i, d in enumerate(difficulty) if d == name]) for name in dict.fromkeys(difficulty)]
    columns = torch.arange(correct.shape[1])
    points = []
    for price in ORACLE_PRICES:
        choice = torch.empty(correct.shape[1], dtype=torch.long)
        for members in groups:
            choice[members] = (correct[:, members] - (price + 1e-6) * flops[:, members]).mean(1).argmax()
        points.append({"price": price, "accuracy": float(correct[choice, columns].mean()),
                       "flops_ratio": float(flops[choice, columns].mean())})
    return points


def efficient(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """The points no other beats on both accuracy and FLOPs, cheapest first."""
    ordered = sorted(points, key=lambda p: (p["flops_ratio"], -p["accuracy"]))
    kept, best = [], -1.0
    for point in ordered:
        if point["accuracy"] > best + 1e-12:
            kept.append(point)
            best = point["accuracy"]
    return kept


def oracle_frontier(correct: torch.Tensor, flops: torch.Tensor) -> list[dict[str, float]]:
    """The Pareto-efficient ``oracle_points``, cheapest first."""
    return efficient(oracle_points(correct, flops))


def oracle_accuracy_at(frontier: list[dict[str, float]], flops_ratio: float) -> float:
    """The oracle's best accuracy at no more than ``flops_ratio`` (0 if it cannot go that low)."""
    reachable = [p["accuracy"] for p in frontier if p["flops_ratio"] <= flops_ratio + FLOPS_TOLERANCE]
    return max(reachable, default=0.0)


def paths_page(report: dict[str, Any]) -> str:
    options = report["options"]
    lines = ["# Routing paths, forced", "",
             f"Model `{options['model']}` (pyramid: {options['pyramid']}) on `{options['data']}`"
             + (f" (first {options['limit']} samples)" if options["limit"] else "") + ". Every sample forced onto "
             "each path; accuracy overall and per difficulty; LLM FLOPs ratio. The oracle takes, for each sample, "
             "the path that maximises correct - price x FLOPs.", ""]
    for mode in report["modes"]:
        lines += [f"## {mode['mode']}", "", "| path | FLOPs ratio | accuracy | easy | medium | hard |", "|---|---|---|---|---|---|"]
        for row in mode["rows"]:
            cells = [f"{row[d]:.1%}" if d in row else "-" for d in DIFFICULTIES]
            lines.append(f"| {' '.join(map(str, row['path']))} | {row['flops_ratio']:.3f} | {row['accuracy']:.1%} | "
                         + " | ".join(cells) + " |")
        lines += ["", "Oracle frontier: " + ", ".join(f"{p['accuracy']:.1%} at {p['flops_ratio']:.3f}"
                                                     for p in mode["oracle"])]
        lines += ["", "Difficulty oracle (one path per difficulty): " + ", ".join(
            f"{p['accuracy']:.1%} at {p['flops_ratio']:.3f}" for p in mode["difficulty_oracle"])]
        if "router" in mode:
            router = mode["router"]
            lines += ["", f"Routers: {router['accuracy']:.1%} at {router['flops_ratio']:.3f} FLOPs; the oracle reaches "
                          f"{router['oracle_accuracy']:.1%} at no more FLOPs (regret {router['regret']:.1%}), the "
                          f"difficulty oracle {router['difficulty_oracle_accuracy']:.1%} (regret "
                          f"{router['difficulty_regret']:.1%})."]
        lines.append("")
    return "\n".join(lines)


def plot_paths(report: dict[str, Any], path: Path) -> Path:
    """Accuracy vs FLOPs: each forced path, the oracle frontier and the routers, one colour per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.2))
    for index, mode in enumerate(report["modes"]):
        colour = f"C{index}"
        axis.scatter([r["flops_ratio"] for r in mode["rows"]], [r["accuracy"] for r in mode["rows"]], color=colour,
                     marker="o", alpha=0.5, label=f"paths ({mode['mode']})")
        axis.plot([p["flops_ratio"] for p in mode["oracle"]], [p["accuracy"] for p in mode["oracle"]], color=colour,
                  label=f"oracle ({mode['mode']})")
        if "router" in mode:
            axis.scatter([mode["router"]["flops_ratio"]], [mode["router"]["accuracy"]], color=colour, marker="*", s=150,
                         label=f"routers ({mode['mode']})")
    axis.set_xlabel("LLM prefill FLOPs / vanilla")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
