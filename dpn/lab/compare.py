"""``dpn compare``: every strategy at several budgets, on one model and one test set.

Trained variants (vanilla, DPN as in the paper, as released and with fitted routers, static,
projector, random, peers fine-tuned with their own strategy, and the ablations) are fine-tuned from
the same base with the same data, steps and learning rates, once per seed. Training-free variants
(FastV, PyramidDrop, DART) run on the vanilla fine-tune of each seed. The DPNs with routers are
evaluated at their own routing and at router biases calibrated to FLOPs targets (no retraining).
``positions`` gives every row but the ablations one position mode (the ablations name theirs).

Each evaluation is a normal ``dpn eval`` run (resumable); so is each fine-tune. The command writes
a markdown page (table with mean ± std over seeds, the ablation table, the exact command at the
top) and accuracy-vs-FLOPs Pareto plots: overall and per difficulty. With ``oracle``, every
routing path of the fitted DPN is evaluated too (``dpn paths``): the oracle frontier goes on the
plots and the routers' regret on the page.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import LlavaConfig

from dpn.budget import UnreachableBudgetError
from dpn import presets
from dpn.config import PyramidConfig
from dpn.models import geometry_of
from dpn.strategies.base import registered_specs, spec_entry, strategy_entry
from dpn.strategies.pooling import PoolingStage
from dpn.lab.engine.console import console as lab_console
from dpn.lab.evaluate import SUMMARY, EvalOptions, evaluate
from dpn.lab.paths import PathsOptions, efficient, run_paths
from dpn.lab.finetune import Recipe, fine_tune
from dpn.lab.train import DEFAULT_ROUTER_FIT_SAMPLES
from dpn.strategies.dpn import DEFAULT_FIT_FLOPS_WEIGHT, DynamicPyramid

# Written in an evaluation's folder instead of its summary when its FLOPs target is unreachable.
SKIPPED = "skipped.txt"

DIFFICULTIES = ("easy", "medium", "hard")
# FLOPs ratios within this of each other count as matched when comparing strategies.
MATCHED_FLOPS_SLACK = 0.02
# The training-free points compare runs by default: FastV, PyramidDrop and DART at three budgets each.
TRAINING_FREE = ("fastv:0.75", "fastv:0.5", "fastv:0.25", "pdrop:0.75", "pdrop:0.5", "pdrop:0.25",
                 "dart:0.75", "dart:0.5", "dart:0.25")
# Plot style per strategy family (matplotlib format strings); other families take the spare styles.
# DPN as its code was released (router tokens, training guard, global hinge), beside the paper's DPN.
RELEASED = "dpn (released)"
# DPN whose routers are fitted to per-path losses after path-robust fine-tuning (dpn.presets.fitted).
FITTED = "dpn (fitted)"
DPN_FAMILIES = ("dpn", RELEASED, FITTED)
# The DPN variants with routers worth calibrating to FLOPs targets.
CALIBRATED = ("dpn", FITTED)
FINE_TUNED = " (fine-tuned)"  # suffix of a peer fine-tuned with its own strategy
ORACLE = "oracle (fitted model's paths)"
# Plot styles (matplotlib format strings) of compare's own rows; a strategy's curve takes the style
# its spec registered (SpecEntry.plot_style), dashed when fine-tuned with its own strategy.
STYLES = {"vanilla": "k*", RELEASED: "C3s--", FITTED: "mo-", ORACLE: "k:"}
SPARE_STYLES = ("C5o:", "C6s:", "C8^:", "C9v:")
# The goal's range of matched FLOPs and its efficiency point (docs/RESULTS.md).
GOAL_FLOPS_RANGE = (0.45, 0.85)
GOAL_FLOPS = 0.6
GOAL_SHARE_OF_VANILLA = 0.95
# The distillation ablations' weight of KL(vanilla || pyramid) beside the LM loss.
DISTILL_WEIGHT = 1.0


@dataclass(frozen=True)
class Variant:
    """One fine-tune: the ``--pyramid`` spec (or config file) it trains with, and the position mode
    it is given (None: the spec's or file's own)."""

    spec: str
    positions: str | None = None
    distill_weight: float = 0.0  # KL toward the same weights without the pyramid (TrainOptions.distill_weight)


@dataclass
class Point:
    """One evaluated configuration: a strategy at one budget."""

    name: str  # unique, e.g. "fastv:0.5"
    family: str  # strategy, for the plot's curves
    trained: str  # the trained variant whose model it runs on
    pyramid: str = "saved"  # evaluation-time pyramid spec (training-free strategies)
    budget: float | None = None  # DPN: calibrate the router bias to this FLOPs fraction
    ablation: bool = False
    positions: str | None = None  # evaluation-time position mode (training-free strategies)
    routed: bool = False  # a --routed preset: DPN routers (fitted), judged beside DPN's own rows


@dataclass
class CompareOptions:
    base: str
    train_data: str
    test_data: str
    out_dir: str = "runs/compare"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-4
    router_learning_rate: float = 1e-3
    train_limit: int | None = None
    test_limit: int | None = None
    static_strides: list[str] = field(default_factory=lambda: ["1x2", "2x2"])
    projector_strides: list[str] = field(default_factory=lambda: ["2x2", "3x3"])
    # Training-free strategies (any --pyramid spec), run on the vanilla fine-tune of each seed.
    training_free: list[str] = field(default_factory=lambda: list(TRAINING_FREE))
    dpn_budgets: list[float] = field(default_factory=lambda: [0.8, 0.6])
    # Peers fine-tuned with their own strategy (any --pyramid spec), beside their training-free rows.
    fine_tuned: list[str] = field(default_factory=lambda: ["fastv:0.5"])
    # Other presets with fitted routers (e.g. "select:0.2", a config file): fine-tuned, then evaluated at
    # their own routing and calibrated to dpn_budgets, like the fitted DPN; judged as DPN rows.
    routed: list[str] = field(default_factory=list)
    fit_flops_weight: float = DEFAULT_FIT_FLOPS_WEIGHT
    router_fit_samples: int = DEFAULT_ROUTER_FIT_SAMPLES
    positions: str | None = "keep"  # every row's position mode but the ablations'; None: each strategy's own
    ablations: bool = True  # what each cause of the paper DPN's losses costs (see ablation_configs)
    paper_ablations: bool = False  # the paper's own ablations: no routing loss, avg pooling, early / late stages
    oracle: bool = False
    measure_latency: bool = True
    markdown: str | None = None
    image_dir: str | None = None
    command: str = "dpn compare"
    progress: bool = True


def trained_variants(options: CompareOptions, model_config: Any, config_dir: Path) -> dict[str, Variant]:
    """Trained variant name -> what it is fine-tuned with."""
    positions = options.positions
    specs = {"vanilla": "none", "dpn": "paper", RELEASED: "released", FITTED: f"fitted:{options.fit_flops_weight:g}",
             "random": "random", **{f"static:{s}": f"static:{s}" for s in options.static_strides},
             **{f"projector:{s}": f"projector:{s}" for s in options.projector_strides},
             **{f"{spec}{FINE_TUNED}": spec for spec in options.fine_tuned}, **{spec: spec for spec in options.routed}}
    variants = {name: Variant(spec, None if spec == "none" else positions) for name, spec in specs.items()}
    configs = {}
    if options.ablations:
        configs.update(cause_ablation_configs(model_config, options))
    if options.paper_ablations:
        configs.update(ablation_configs(model_config, positions))
    for name, config in configs.items():
        variants[name] = Variant(str(config.save(config_dir / f"{_slug(name)}.json")))
    if options.ablations:
        for name in ("dpn", FITTED):
            variants[f"{name}, distilled from vanilla"] = replace(variants[name], distill_weight=DISTILL_WEIGHT)
    return variants


def cause_ablation_configs(model_config: Any, options: CompareOptions) -> dict[str, PyramidConfig]:
    """One change each to the main rows, for the causes of the paper DPN's losses (issue 24): the
    other position mode (for DPN, the fitted DPN and static pooling), the probability scaling
    (straight-through: values unscaled, the same gradient) and the routers' temperature (1, not 10,
    or annealed from 10 to 1). ``trained_variants`` adds distillation from the vanilla model."""
    main = options.positions or "renumber"
    other = "renumber" if main == "keep" else "keep"
    return {
        f"dpn, {other} positions": presets.paper(model_config, positions=other),
        "dpn, unscaled tokens (straight-through)": presets.paper(model_config, positions=main,
                                                                 probability_scale="straight_through"),
        "dpn, temperature 1": presets.paper(model_config, positions=main, router_temperature=1.0),
        "dpn, temperature 10 to 1": presets.paper(model_config, positions=main, router_temperature=1.0,
                                                  router_temperature_start=10.0),
        f"{FITTED}, {other} positions": presets.fitted(model_config, options.fit_flops_weight, positions=other),
        f"static:2x2, {other} positions": presets.static(model_config, (2, 2), positions=other),
    }


def ablation_configs(model_config: Any, positions: str | None = None) -> dict[str, PyramidConfig]:
    """The paper's ablations of DPN: routing loss off, average pooling, stages early or late."""
    shared = {"positions": positions} if positions else {}
    paper = presets.paper(model_config, **shared)
    num_layers = geometry_of(model_config).num_layers
    count = len(paper.stages)

    def at(layers: list[int]) -> PyramidConfig:
        stages = [PoolingStage(layer, stage.experts) for layer, stage in zip(layers, paper.stages)]
        return PyramidConfig(stages=stages, strategy=paper.strategy, positions=paper.positions)

    early = list(range(count))
    late = list(range(num_layers - 1 - count, num_layers - 1))
    configs = {
        "dpn, no routing loss": presets.paper(model_config, routing_loss="none", **shared),
        "dpn, avg pooling": presets.paper(model_config, pooling="avg", **shared),
    }
    if early != [s.layer for s in paper.stages]:
        configs["dpn, early stages"] = at(early)
    if late != [s.layer for s in paper.stages] and late != early:
        configs["dpn, late stages"] = at(late)
    return configs


def evaluation_points(options: CompareOptions, trained: dict[str, Variant]) -> list[Point]:
    points = [Point("vanilla", "vanilla", "vanilla"), Point("dpn", "dpn", "dpn"), Point(RELEASED, RELEASED, RELEASED),
              Point(FITTED, FITTED, FITTED)]
    points += [Point(f"{family} @ {b:g} FLOPs", family, family, budget=b)
               for family in CALIBRATED for b in options.dpn_budgets]
    points += [Point(name, name.split(":")[0], name) for name in trained if name.startswith(("static:", "projector:"))
               and "," not in name]
    points.append(Point("random", "random", "random"))
    points += [Point(spec, spec.partition(":")[0], "vanilla", pyramid=spec, positions=options.positions)
               for spec in options.training_free]
    points += [Point(name, name.partition(":")[0] + FINE_TUNED, name) for name in trained if name.endswith(FINE_TUNED)]
    for spec in options.routed:
        family = _routed_family(spec)
        points.append(Point(spec, family, spec, routed=True))
        points += [Point(f"{spec} @ {b:g} FLOPs", family, spec, budget=b, routed=True) for b in options.dpn_budgets]
    points += [Point(name, _base_family(name.partition(",")[0]), name, ablation=True) for name in trained if ", " in name]
    return points


def _routed_family(spec: str) -> str:
    """The curve of a --routed preset: its spec name, or a config file's stem."""
    return Path(spec).stem if spec.endswith(".json") else spec.partition(":")[0]


def is_dpn_row(row: dict[str, Any]) -> bool:
    """Whether a row is one of DPN's (its routers or its variants): judged against the peers, not as one."""
    return row["family"] in DPN_FAMILIES or bool(row.get("routed"))


def check_routed_specs(options: CompareOptions, model_config: Any) -> None:
    """A --routed spec is its own row (it may not also name a training-free or fine-tuned point) and
    a pyramid with routers to calibrate; said before any fine-tuning starts."""
    for spec in options.routed:
        config = presets.from_spec(spec, model_config)
        if config is None or not issubclass(strategy_entry(config.strategy.name).strategy_class, DynamicPyramid):
            kind = "no pyramid" if config is None else f"a {config.strategy.name} pyramid, which has no routers"
            raise ValueError(f"--routed {spec}: {kind}; --routed takes presets whose routers can be calibrated "
                             "(select:0.2, a saved routed pyramid); give peers with --fine-tuned")
    taken = {*options.training_free, *options.fine_tuned, "vanilla", "dpn", "random"}
    clashes = sorted(set(options.routed) & taken)
    if clashes:
        raise ValueError(f"--routed {' '.join(clashes)}: also given as a training-free or fine-tuned peer (or a row "
                         "compare builds itself); a spec is one row")
    if len(set(options.routed)) != len(options.routed):
        raise ValueError(f"--routed names a spec twice: {options.routed}")


def _base_family(name: str) -> str:
    """The curve a variant belongs to: its strategy without the argument ("static:2x2" -> "static")."""
    return name if name in DPN_FAMILIES else name.partition(":")[0]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def run_compare(options: CompareOptions, console: Console | None = None) -> dict[str, Any]:
    console = console or lab_console()
    if not options.seeds:
        raise ValueError("give at least one seed")
    for path, what in ((Path(options.base) / "config.json", "model to fine-tune"),
                       (Path(options.train_data), "training data"), (Path(options.test_data), "test data")):
        if not path.is_file():
            raise FileNotFoundError(f"no {what} at {path}")
    start = time.perf_counter()
    out = Path(options.out_dir)
    model_config = LlavaConfig.from_pretrained(options.base)
    check_routed_specs(options, model_config)
    trained = trained_variants(options, model_config, out / "configs")
    points = evaluation_points(options, trained)
    runs = len(trained) * len(options.seeds)
    console.print(f"[bold]dpn compare[/]: {len(trained)} trained variants x {len(options.seeds)} seeds = {runs} "
                  f"fine-tunes of {options.steps} steps, then {len(points) * len(options.seeds)} evaluations")
    summaries: dict[str, list[dict[str, Any]]] = {p.name: [] for p in points}
    work_done = not _all_done(out, trained, points, options.seeds)
    skipped: dict[str, str] = {}
    for seed in options.seeds:
        models = {name: _finetune(options, name, variant, seed, out, console) for name, variant in trained.items()}
        for point in points:
            if point.name in skipped:
                continue
            try:
                summaries[point.name].append(_evaluate(options, point, models[point.trained], seed, out))
            except UnreachableBudgetError as error:
                # One unreachable FLOPs target must not cost the rest of the comparison.
                skipped[point.name] = str(error)
                console.print(f"[yellow]skipping {point.name} (seed {seed}): {error}[/]")
    rows = [aggregate(point, summaries[point.name]) for point in points if point.name not in skipped]
    report = {"options": asdict(options), "rows": rows, "skipped": skipped}
    if options.oracle:
        report["oracle"] = oracle_over_seeds(options, out, console)
    report["elapsed_seconds"] = _previous_seconds(out, work_done) + time.perf_counter() - start
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    images = Path(options.image_dir) if options.image_dir else out
    plots = plot_pareto(rows, images, report.get("oracle"))
    report["router_learning"] = router_learning(out, trained, options.seeds)
    page = results_page(report, plots, Path(options.markdown).parent if options.markdown else out)
    (Path(options.markdown) if options.markdown else out / "RESULTS.md").write_text(page)
    console.print(page)
    return report


def oracle_over_seeds(options: CompareOptions, out: Path, console: Console) -> dict[str, Any]:
    """Every routing path of each seed's fitted DPN, forced (``dpn paths``): the oracle frontier
    (mean over seeds at each price of FLOPs) and the fitted routers' regret against it."""
    reports = []
    for seed in options.seeds:
        console.print(f"every routing path of {FITTED} (seed {seed})")
        reports.append(run_paths(PathsOptions(
            model=str(_train_dir(out, FITTED, seed)), data=options.test_data, output_dir=str(out / "paths" / f"seed{seed}"),
            positions=[options.positions or "keep"], scales=["none"], limit=options.test_limit,
            batch_size=options.batch_size, progress=options.progress,
        ))["modes"][0])
    by_price = [{"price": points[0]["price"],
                 "accuracy": statistics.mean(p["accuracy"] for p in points),
                 "flops_ratio": statistics.mean(p["flops_ratio"] for p in points)}
                for points in zip(*(mode["oracle_by_price"] for mode in reports))]
    return {"frontier": efficient(by_price), "regret": _mean_std([mode["router"]["regret"] for mode in reports]),
            "router_flops": _mean_std([mode["router"]["flops_ratio"] for mode in reports])}


def _train_dir(out: Path, name: str, seed: int) -> Path:
    return out / "train" / _slug(name) / f"seed{seed}"


def _eval_dir(out: Path, point: Point, seed: int) -> Path:
    return out / "eval" / _slug(point.name) / f"seed{seed}"


def _all_done(out: Path, trained: dict[str, Variant], points: list[Point], seeds: list[int]) -> bool:
    return all((_train_dir(out, name, seed) / "train_options.json").is_file() for name in trained for seed in seeds) \
        and all((_eval_dir(out, point, seed) / SUMMARY).is_file() or (_eval_dir(out, point, seed) / SKIPPED).is_file()
                for point in points for seed in seeds)


def _previous_seconds(out: Path, work_done: bool) -> float:
    """Wall time already spent by earlier invocations on this ``out`` (a resumed or re-rendered compare)."""
    previous = out / "compare.json"
    if not previous.is_file():
        return 0.0
    seconds = json.loads(previous.read_text()).get("elapsed_seconds", 0.0)
    return seconds if not work_done else 0.0


def _finetune(options: CompareOptions, name: str, variant: Variant, seed: int, out: Path, console: Console) -> Path:
    run_dir = _train_dir(out, name, seed)
    if (run_dir / "train_options.json").is_file():
        _check_reused(run_dir, name, variant)
        return run_dir
    console.print(f"fine-tuning {name} (seed {seed})")
    recipe = Recipe(steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
                    router_learning_rate=options.router_learning_rate, seed=seed, train_limit=options.train_limit,
                    router_fit_samples=options.router_fit_samples, progress=options.progress)
    return fine_tune(recipe, options.base, options.train_data, run_dir, variant.spec, positions=variant.positions,
                     distill_weight=variant.distill_weight)


def _check_reused(run_dir: Path, name: str, variant: Variant) -> None:
    """Refuse a finished fine-tune of another recipe under this variant's name (an older compare in
    the same --out, say), rather than report it as this one."""
    recorded = json.loads((run_dir / "train_options.json").read_text())["options"]
    found = Variant(recorded["pyramid"], recorded.get("positions"), recorded.get("distill_weight", 0.0))
    if found != variant:
        raise ValueError(f"{run_dir} holds a fine-tune of {name!r} with {found}, not {variant}: use another --out "
                         "(or delete that folder to redo it)")


def _evaluate(options: CompareOptions, point: Point, model: Path, seed: int, out: Path) -> dict[str, Any]:
    eval_dir = _eval_dir(out, point, seed)
    if (eval_dir / SUMMARY).is_file():
        return json.loads((eval_dir / SUMMARY).read_text())
    if (eval_dir / SKIPPED).is_file():
        raise UnreachableBudgetError((eval_dir / SKIPPED).read_text().strip())
    try:
        return evaluate(EvalOptions(
            model=str(model), data=options.test_data, output_dir=str(eval_dir), pyramid=point.pyramid,
            positions=point.positions, budget=point.budget, batch_size=options.batch_size, limit=options.test_limit,
            plot=False,
            measure_latency=options.measure_latency, progress=options.progress,
        ))
    except UnreachableBudgetError as error:
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / SKIPPED).write_text(str(error) + "\n")
        raise


def _mean_std(values: list[float]) -> list[float]:
    """[mean, sample standard deviation] (a list, as it round-trips through JSON)."""
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def aggregate(point: Point, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of one point's figures."""
    row: dict[str, Any] = {**asdict(point), "seeds": len(summaries)}
    row["accuracy"] = _mean_std([s["overall"]["accuracy"] for s in summaries])
    for difficulty in DIFFICULTIES:
        values = [s["difficulty"][difficulty]["accuracy"] for s in summaries if difficulty in s["difficulty"]]
        if values:
            row[difficulty] = _mean_std(values)
    row["flops_ratio"] = _mean_std([s["overall"].get("flops_ratio", 1.0) for s in summaries])
    kept = [s["overall"]["visual_tokens"][-1] for s in summaries if s["overall"].get("visual_tokens")]
    row["kept_tokens"] = _mean_std(kept) if kept else None
    latency = [s["prefill_latency_ratio"] for s in summaries if "prefill_latency_ratio" in s]
    row["latency_ratio"] = _mean_std(latency) if latency else None
    hard = [s["difficulty"]["hard"]["visual_tokens"][-1] for s in summaries
            if s["difficulty"].get("hard", {}).get("visual_tokens")]
    easy = [s["difficulty"]["easy"]["visual_tokens"][-1] for s in summaries
            if s["difficulty"].get("easy", {}).get("visual_tokens")]
    row["kept_hard_easy"] = [statistics.mean(hard), statistics.mean(easy)] if hard and easy else None
    return row


def _cell(value: list[float] | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.1%} ± {std:.1%}" if percent else f"{mean:.3f} ± {std:.3f}"


TABLE_COLUMNS = ("strategy", "accuracy", "easy", "medium", "hard", "kept visual tokens", "LLM FLOPs ratio",
                 "prefill latency ratio")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    for row in rows:
        kept = row["kept_tokens"]
        lines.append("| " + " | ".join([
            row["name"], _cell(row["accuracy"], True),
            *(_cell(row.get(d), True) for d in DIFFICULTIES),
            f"{kept[0]:.1f}" if kept else "all", _cell(row["flops_ratio"]),
            "1 (reference)" if row["family"] == "vanilla" else _cell(row["latency_ratio"]),
        ]) + " |")
    return "\n".join(lines)


def router_learning(out: Path, trained: dict[str, Variant], seeds: list[int]) -> list[str]:
    """A table per DPN variant from its training logs (mean over seeds at each logged step): each
    stage's router entropy (1 = uniform) and, per difficulty, the mean index of the expert its
    router ranks first (0 = keep every token; higher = stronger pooling)."""
    lines = []
    for name in (n for n in trained if n in ("dpn", RELEASED)):  # fitted routers learn after training, not in it
        logs = []
        for seed in seeds:
            path = _train_dir(out, name, seed) / "log_history.json"
            if path.is_file():
                logs.append({entry["step"]: entry for entry in json.loads(path.read_text()) if "loss" in entry})
        steps = sorted(set.intersection(*(set(log) for log in logs))) if logs else []
        if not steps:
            continue
        stages = sorted({int(key[5:].split("_")[0]) for key in logs[0][steps[0]] if key.endswith("_entropy")})
        header = ["step", *(f"stage {s}: entropy, first-ranked expert easy / medium / hard" for s in stages)]
        lines += [f"**{name}**", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for step in steps:
            cells = [str(step)]
            for stage in stages:
                entropy = _mean_logged(logs, step, f"stage{stage}_entropy")
                tops = [_first_ranked(logs, step, stage, d) for d in DIFFICULTIES]
                cells.append(f"{entropy:.3f}; " + " / ".join("-" if t is None else f"{t:.2f}" for t in tops))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _mean_logged(logs: list[dict], step: int, key: str) -> float | None:
    values = [log[step][key] for log in logs if key in log[step]]
    return statistics.mean(values) if values else None


def _first_ranked(logs: list[dict], step: int, stage: int, difficulty: str) -> float | None:
    """Mean over seeds of sum_e e * (share of ``difficulty`` samples whose router ranks expert e first)."""
    prefix = f"stage{stage}_{difficulty}_top"
    values = [sum(int(key[len(prefix):]) * share for key, share in log[step].items() if key.startswith(prefix))
              for log in logs if any(key.startswith(prefix) for key in log[step])]
    return statistics.mean(values) if values else None


def dominance(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements, both ways: for each peer point, the most accurate DPN point at no more
    FLOPs (+0.02); for each DPN point, the peer points at no more FLOPs that are at least as accurate."""
    def cheaper(candidates, row):
        return [c for c in candidates if c["flops_ratio"][0] <= row["flops_ratio"][0] + MATCHED_FLOPS_SLACK]

    dpn_points = [r for r in rows if is_dpn_row(r) and not r["ablation"]]
    peers = [r for r in rows if not is_dpn_row(r) and r["family"] != "vanilla" and not r["ablation"]]
    lines = []
    for row in peers:
        matched = cheaper(dpn_points, row)
        if not matched:
            lines.append(f"- {row['name']} ({row['flops_ratio'][0]:.3f} FLOPs, {row['accuracy'][0]:.1%}): "
                         "no DPN point at or below its FLOPs")
            continue
        best = max(matched, key=lambda d: d["accuracy"][0])
        verdict = "DPN at least as accurate" if best["accuracy"][0] >= row["accuracy"][0] else "DPN less accurate"
        lines.append(f"- {row['name']} ({row['flops_ratio'][0]:.3f} FLOPs, {row['accuracy'][0]:.1%}) vs {best['name']} "
                     f"({best['flops_ratio'][0]:.3f}, {best['accuracy'][0]:.1%}): {verdict}")
    for point in dpn_points:
        better = [p for p in cheaper(peers, point) if p["accuracy"][0] >= point["accuracy"][0]]
        if better:
            names = ", ".join(f"{p['name']} ({p['flops_ratio'][0]:.3f}, {p['accuracy'][0]:.1%})" for p in better)
            lines.append(f"- {point['name']} ({point['flops_ratio'][0]:.3f} FLOPs, {point['accuracy'][0]:.1%}) is "
                         f"matched or beaten at no more FLOPs by: {names}")
    return lines


def goal_check(rows: list[dict[str, Any]], family: str = FITTED) -> list[str]:
    """The goal of issue 24, stated from the rows: the DPN preset ``family`` (the fitted DPN, or a
    --routed preset) at least as accurate as every peer point (not DPN, not vanilla) with FLOPs in
    ``GOAL_FLOPS_RANGE`` at no more FLOPs (+ slack); its accuracy at no more than ``GOAL_FLOPS`` as
    a share of vanilla's; hard vs easy kept tokens."""
    fitted = [r for r in rows if r["family"] == family]
    if not fitted:
        return [f"- no {family} row"]
    low, high = GOAL_FLOPS_RANGE
    peers = [r for r in rows if not is_dpn_row(r) and r["family"] != "vanilla" and low <= r["flops_ratio"][0] <= high]
    lines, met = [], 0
    for peer in sorted(peers, key=lambda r: r["flops_ratio"][0]):
        matched = [f for f in fitted if f["flops_ratio"][0] <= peer["flops_ratio"][0] + MATCHED_FLOPS_SLACK]
        best = max(matched, key=lambda f: f["accuracy"][0], default=None)
        ok = best is not None and best["accuracy"][0] >= peer["accuracy"][0]
        met += ok
        against = "none at or below its FLOPs" if best is None else (
            f"{best['name']} {best['accuracy'][0]:.1%} at {best['flops_ratio'][0]:.3f}")
        lines.append(f"- {peer['name']} ({peer['accuracy'][0]:.1%} at {peer['flops_ratio'][0]:.3f}): {against}: "
                     + ("at least as accurate" if ok else "less accurate"))
    lines.insert(0, f"At least as accurate as {met} of the {len(peers)} peer points with {low}-{high} FLOPs, at no "
                    f"more FLOPs (+{MATCHED_FLOPS_SLACK}):")
    lines.insert(1, "")
    vanilla = next((r for r in rows if r["family"] == "vanilla"), None)
    cheap = [f for f in fitted if f["flops_ratio"][0] <= GOAL_FLOPS]
    if vanilla is not None and vanilla["accuracy"][0] > 0 and cheap:
        best = max(cheap, key=lambda f: f["accuracy"][0])
        share = best["accuracy"][0] / vanilla["accuracy"][0]
        lines += ["", f"At {GOAL_FLOPS} FLOPs or fewer: {best['name']} keeps {share:.1%} of vanilla's accuracy "
                      f"({best['accuracy'][0]:.1%} vs {vanilla['accuracy'][0]:.1%}, at {best['flops_ratio'][0]:.3f}); "
                      f"the goal is {GOAL_SHARE_OF_VANILLA:.0%}."]
    kept = [f for f in fitted if f["kept_hard_easy"]]
    if kept:
        lines += ["", "Kept visual tokens, hard vs easy questions: " + "; ".join(
            f"{f['name']} {f['kept_hard_easy'][0]:.1f} vs {f['kept_hard_easy'][1]:.1f}" for f in kept) + "."]
    return lines


def oracle_lines(oracle: dict[str, Any] | None) -> list[str]:
    if oracle is None:
        return []
    frontier = ", ".join(f"{p['accuracy']:.1%} at {p['flops_ratio']:.3f}" for p in oracle["frontier"])
    return ["", f"Oracle on the fitted models' own paths (every sample the path that maximises correct - price x FLOPs, "
                f"mean over seeds; `dpn paths`): {frontier}. The fitted routers' regret against it at their own "
                f"FLOPs ({oracle['router_flops'][0]:.3f}): {oracle['regret'][0]:.1%} ± {oracle['regret'][1]:.1%}."]


def plot_styles(families: set[str]) -> dict[str, str]:
    """Each curve's style, in legend order: compare's own rows, then the registered specs' order."""
    order = ["vanilla", "dpn", *STYLES, *(entry.name for entry in registered_specs())]

    def rank(family: str) -> tuple[int, str]:
        name = _spec_name(family)
        return order.index(name) if name in order else len(order), family

    found = {}
    for family in sorted(families, key=rank):
        base = spec_entry(_spec_name(family))
        style = STYLES.get(family) or (base.plot_style if base else None)
        if style and family.endswith(FINE_TUNED):
            style = style.rstrip("-") + "--"
        found[family] = style
    spare = itertools.cycle(SPARE_STYLES)
    return {family: style or next(spare) for family, style in found.items()}


def _spec_name(family: str) -> str:
    return family.removesuffix(FINE_TUNED)


def plot_pareto(rows: list[dict[str, Any]], image_dir: Path, oracle: dict[str, Any] | None = None) -> list[Path]:
    """Accuracy vs LLM FLOPs ratio, one curve per strategy: overall, then one plot per difficulty;
    the overall plot also draws the oracle frontier when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("accuracy", *DIFFICULTIES):
        figure, axis = plt.subplots(figsize=(6, 4.2))
        present = {r["family"] for r in rows if not r["ablation"] and r.get(metric)}
        styles = plot_styles(present)
        families = list(styles)  # in legend order
        for family in families:
            points = sorted((r for r in rows if r["family"] == family and not r["ablation"] and r.get(metric)),
                            key=lambda r: r["flops_ratio"][0])
            axis.errorbar([p["flops_ratio"][0] for p in points], [p[metric][0] for p in points],
                          yerr=[p[metric][1] for p in points], fmt=styles[family], label=family, capsize=3)
        if oracle is not None and metric == "accuracy":
            axis.plot([p["flops_ratio"] for p in oracle["frontier"]], [p["accuracy"] for p in oracle["frontier"]],
                      STYLES[ORACLE], label=ORACLE)
        axis.set_xlabel("LLM prefill FLOPs / vanilla")
        axis.set_ylabel(f"{metric} accuracy" if metric != "accuracy" else "accuracy (all questions)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = image_dir / f"pareto_{metric}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def results_page(report: dict[str, Any], plots: list[Path], page_dir: Path) -> str:
    options = report["options"]
    rows = report["rows"]
    main = [r for r in rows if not r["ablation"]]
    ablations = [r for r in rows if r["ablation"] or r["name"] in ("dpn", FITTED, "static:2x2", "random")]
    images = "\n".join(f"![{p.stem}]({_relative(p, page_dir)})" for p in plots)
    hard_easy = [f"- {r['name']}: hard {r['kept_hard_easy'][0]:.1f} vs easy {r['kept_hard_easy'][1]:.1f}"
                 for r in rows if r["kept_hard_easy"] and is_dpn_row(r)]
    candidates = [FITTED, *dict.fromkeys(r["family"] for r in main if r.get("routed"))]
    goals = [line for family in candidates
             for line in ["", f"## Is {family} on the Pareto frontier?", "", *goal_check(main, family)]]
    return "\n".join([
        "# Accuracy vs compute: DPN and its peers",
        "",
        "Regenerate this page with:",
        "",
        "```bash",
        options["command"],
        "```",
        "",
        f"Base model `{options['base']}`; fine-tuning data `{options['train_data']}` ({options['steps']} steps, "
        f"batch {options['batch_size']}, lr {options['learning_rate']}, router lr {options['router_learning_rate']}); "
        f"test data `{options['test_data']}`"
        + (f" (first {options['test_limit']} samples)" if options["test_limit"] else "")
        + f"; seeds {options['seeds']}. Mean ± standard deviation over seeds. Wall time "
        f"{report['elapsed_seconds'] / 60:.0f} min.",
        "",
        "FLOPs ratio: LLM prefill, analytic from the tokens each layer processed (`dpn.flops`). Latency ratio: "
        "measured prefill time with / without the strategy on the same batches, on the machine that ran the command. "
        "Rows named by a training-free spec run on the vanilla fine-tune; `(fine-tuned)` rows and every other row are "
        "fine-tuned with their strategy. `X @ F FLOPs` is the trained DPN X with its router bias calibrated to F (no "
        f"retraining). `{FITTED}` is `dpn.presets.fitted`: fine-tuned on uniformly drawn paths, then its routers fitted "
        "to each training sample's LM loss + FLOPs price under every path"
        + (f"; {', '.join(f'`{spec}`' for spec in options.get('routed', []))}: fitted-router presets given with "
           "`--routed`, fine-tuned and calibrated the same way" if options.get("routed") else "")
        + f". Position mode of every row but the ablations: {options.get('positions') or 'each strategy its own'}.",
        "",
        table(main),
        *[f"\nNot evaluated: {name}: {reason}" for name, reason in report.get("skipped", {}).items()],
        "",
        images,
        "",
        "## Does DPN dominate at matched FLOPs?",
        "",
        *dominance(main),
        "",
        *goals[1:],
        *oracle_lines(report.get("oracle")),
        "",
        "Kept visual tokens after the last stage, hard vs easy questions (DPN rows):",
        "",
        *hard_easy,
        "",
        "## Ablations",
        "",
        table(ablations),
        "",
        "## Do the routers learn?",
        "",
        "From the training logs (`log_history.json` of each fine-tune; mean over seeds): the routers' entropy per "
        "stage (1 = uniform, 0 = certain) and, per difficulty, the mean index of the expert each sample's router "
        "ranks first (what inference would pick; 0 keeps every token). Routers that tell questions apart give hard "
        "questions lower numbers than easy ones.",
        "",
        *report.get("router_learning", []),
    ])


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())
