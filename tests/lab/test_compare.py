"""A few-step smoke run of ``dpn compare`` on a tiny slice: every strategy, two seeds, table and plots."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rich.console import Console

import dpn
from dpn.lab.families import zoo
from dpn.lab.cli import main
from dpn.lab.compare import (
    CompareOptions, Variant, ablation_configs, cause_ablation_configs, run_compare, trained_variants,
)
from dpn.lab.data.synthetic import generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model, processor = zoo.build_tiny(seed=0)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    generate(root / "data", train=16, val=0, test=9, seed=0, progress=False)
    return root


@pytest.mark.slow
def test_compare_runs_every_strategy_and_writes_the_page(setup, tmp_path):
    options = CompareOptions(
        base=str(setup / "base"), train_data=str(setup / "data" / "train.json"),
        test_data=str(setup / "data" / "test.json"), out_dir=str(tmp_path / "runs"), seeds=[0, 1], steps=2,
        batch_size=4, static_strides=["2x2"], projector_strides=["3x3"], training_free=["fastv:0.5", "pdrop:0.5", "dart:0.5"],
        dpn_budgets=[0.9, 0.05], fine_tuned=["fastv:0.5"], routed=["select:0.5"], router_fit_samples=8, ablations=False, oracle=True,
        measure_latency=False, markdown=str(tmp_path / "docs" / "RESULTS.md"), image_dir=str(tmp_path / "docs" / "img"),
        command="dpn compare --test", progress=False,
    )
    report = run_compare(options, console=Console(file=open(tmp_path / "console.txt", "w")))
    rows = {row["name"]: row for row in report["rows"]}
    assert {"vanilla", "dpn", "dpn (released)", "dpn (fitted)", "dpn @ 0.9 FLOPs", "dpn (fitted) @ 0.9 FLOPs",
            "static:2x2", "projector:3x3", "random", "fastv:0.5", "pdrop:0.5", "dart:0.5",
            "fastv:0.5 (fine-tuned)", "select:0.5", "select:0.5 @ 0.9 FLOPs"} == set(rows)
    assert all(row["seeds"] == 2 for row in rows.values())
    # an unreachable FLOPs target is skipped with its reason, not fatal to the comparison
    assert list(report["skipped"]) == ["dpn @ 0.05 FLOPs", "dpn (fitted) @ 0.05 FLOPs", "select:0.5 @ 0.05 FLOPs"]
    assert "cannot go below" in report["skipped"]["dpn @ 0.05 FLOPs"]
    assert rows["vanilla"]["flops_ratio"] == [1.0, 0.0]
    # Every compressing strategy spends fewer FLOPs than vanilla; FastV keeps half the tokens after its layer.
    assert all(row["flops_ratio"][0] < 1 for name, row in rows.items()
               if name not in ("vanilla", "dpn", "dpn (released)", "dpn (fitted)", "select:0.5") and not row["ablation"])
    # A --routed preset: fine-tuned with its own routers, calibrated like the fitted DPN, judged as a DPN row.
    assert rows["select:0.5"]["routed"] and rows["select:0.5 @ 0.9 FLOPs"]["flops_ratio"][0] <= 0.9 + 1e-6
    assert json.loads((tmp_path / "runs" / "train" / "select_0.5" / "seed1" / "pyramid_config.json").read_text())[
        "strategy"]["name"] == "routed_selection"
    assert rows["fastv:0.5 (fine-tuned)"]["kept_tokens"][0] == 72.0 and rows["fastv:0.5 (fine-tuned)"]["family"] == \
        "fastv (fine-tuned)"
    # One position mode for every row (keep, the default): the fine-tunes and the training-free evaluations.
    for run in (tmp_path / "runs" / "train").glob("*/seed0"):
        if (run / "pyramid_config.json").is_file():
            assert json.loads((run / "pyramid_config.json").read_text())["positions"] == "keep", run
    assert json.loads((tmp_path / "runs" / "eval" / "pdrop_0.5" / "seed0" / "summary.json").read_text())[
        "pyramid"]["positions"] == "keep"
    # The oracle: every path of each seed's fitted DPN; its frontier reaches the routers' accuracy at no more FLOPs.
    oracle = report["oracle"]
    assert oracle["regret"][0] >= 0 and len(oracle["frontier"]) >= 1
    assert (tmp_path / "runs" / "paths" / "seed1" / "PATHS.md").is_file()
    assert rows["fastv:0.5"]["kept_tokens"][0] == 72.0 and rows["dart:0.5"]["kept_tokens"][0] == 72.0
    assert rows["dpn @ 0.9 FLOPs"]["flops_ratio"][0] <= 0.9 + 1e-6
    page = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "```bash\ndpn compare --test\n```" in page and "| fastv:0.5 |" in page and "## Ablations" in page
    assert "## Is dpn (fitted) on the Pareto frontier?" in page and "## Is select on the Pareto frontier?" in page
    assert "Oracle on the fitted models' own paths" in page
    assert "![pareto_hard](img/pareto_hard.png)" in page and "Not evaluated: dpn @ 0.05 FLOPs" in page
    # The routers' learning, from each DPN variant's training logs: one row per logged step (2 steps).
    learning = page.split("## Do the routers learn?")[1]
    for name in ("dpn", "dpn (released)"):
        table_rows = learning.split(f"**{name}**")[1].split("\n\n")[1].splitlines()
        assert [row.split(" | ")[0] for row in table_rows[2:]] == ["| 1", "| 2"]
        for row in table_rows[2:]:  # per stage: "entropy; easy / medium / hard" ("-" where a batch had none)
            for cell in row.strip("| ").split(" | ")[1:]:
                entropy, tops = cell.split("; ")
                assert 0 <= float(entropy) <= 1 and len(tops.split(" / ")) == 3
    for metric in ("accuracy", "easy", "hard"):
        assert (tmp_path / "docs" / "img" / f"pareto_{metric}.png").stat().st_size > 1000
    # Each fine-tune and evaluation is written once; a second run reuses them and gives the same table.
    again = run_compare(options, console=Console(file=open(tmp_path / "console2.txt", "w")))
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
    assert again["skipped"] == report["skipped"]
    assert json.loads((tmp_path / "runs" / "compare.json").read_text())["rows"] == again["rows"]
    # A fine-tune of another recipe under a variant's name is refused, not reused.
    with pytest.raises(ValueError, match="holds a fine-tune of 'dpn'"):
        run_compare(replace(options, positions="renumber"), console=Console(file=open(tmp_path / "c3.txt", "w")))


def test_cause_ablations_change_one_thing_each(tmp_path):
    model_config = zoo.build_tiny()[0].config
    options = CompareOptions(base="b", train_data="t", test_data="t", positions="keep")
    configs = cause_ablation_configs(model_config, options)
    assert configs["dpn, renumber positions"] == dpn.presets.paper(model_config, positions="renumber")
    scaled = configs["dpn, unscaled tokens (straight-through)"]
    assert scaled.positions == "keep" and scaled.strategy.probability_scale == "straight_through"
    assert configs["dpn, temperature 1"].strategy.router_temperature == 1.0
    assert configs["dpn (fitted), renumber positions"] == dpn.presets.fitted(model_config, positions="renumber")
    assert configs["static:2x2, renumber positions"].positions == "renumber"
    annealed = configs["dpn, temperature 10 to 1"].strategy
    assert (annealed.router_temperature_start, annealed.router_temperature) == (10.0, 1.0)
    variants = trained_variants(options, model_config, tmp_path)
    assert variants["dpn"] == Variant("paper", "keep") and variants["vanilla"] == Variant("none", None)
    assert variants["dpn (fitted), distilled from vanilla"] == Variant("fitted:0.5", "keep", distill_weight=1.0)


def test_ablations_change_one_thing_each():
    model_config = zoo.build_tiny()[0].config
    paper = dpn.presets.paper(model_config)
    configs = ablation_configs(model_config)
    assert configs["dpn, no routing loss"].strategy.routing_loss == "none"
    assert configs["dpn, avg pooling"].strategy.pooling == "avg" and paper.strategy.pooling == "max"
    layers = {name: [s.layer for s in config.stages] for name, config in configs.items()}
    assert layers["dpn, early stages"] == [0, 1] and layers["dpn, late stages"] == [3, 4]
    assert [s.layer for s in paper.stages] == [1, 2]
    for config in configs.values():  # everything else is the paper's
        assert [s.experts for s in config.stages] == [s.experts for s in paper.stages]


def test_compare_cli_says_when_the_base_is_missing(setup, tmp_path, capsys):
    code = main(["compare", "--base", str(tmp_path / "nowhere"), "--train-data", str(setup / "data" / "train.json"),
                 "--test-data", str(setup / "data" / "test.json"), "--out", str(tmp_path)])
    assert code == 2 and "no model to fine-tune at" in capsys.readouterr().err


def test_dominance_is_stated_both_ways():
    from dpn.lab.compare import dominance

    def row(name, family, flops, accuracy):
        return {"name": name, "family": family, "ablation": False, "flops_ratio": [flops, 0.0],
                "accuracy": [accuracy, 0.0]}

    rows = [row("vanilla", "vanilla", 1.0, 0.6), row("dpn", "dpn", 0.65, 0.48),
            row("fastv:0.5", "fastv", 0.68, 0.31), row("projector:2x2", "projector", 0.30, 0.47),
            row("static:2x2", "static", 0.45, 0.50)]
    lines = dominance(rows)
    assert "- fastv:0.5 (0.680 FLOPs, 31.0%) vs dpn (0.650, 48.0%): DPN at least as accurate" in lines
    assert "- projector:2x2 (0.300 FLOPs, 47.0%): no DPN point at or below its FLOPs" in lines
    assert lines[-1] == ("- dpn (0.650 FLOPs, 48.0%) is matched or beaten at no more FLOPs by: "
                         "static:2x2 (0.450, 50.0%)")


def test_routed_presets_are_judged_as_dpn_rows_and_may_not_double_a_peer():
    from dpn.lab.compare import check_routed_specs, dominance, goal_check

    def row(name, family, flops, accuracy, routed=False):
        return {"name": name, "family": family, "ablation": False, "flops_ratio": [flops, 0.0],
                "accuracy": [accuracy, 0.0], "routed": routed, "kept_hard_easy": None}

    rows = [row("vanilla", "vanilla", 1.0, 0.9), row("fastv:0.5", "fastv", 0.68, 0.80),
            row("select:0.2", "select", 0.60, 0.86, routed=True), row("static:2x2", "static", 0.45, 0.70)]
    lines = dominance(rows)
    assert "- fastv:0.5 (0.680 FLOPs, 80.0%) vs select:0.2 (0.600, 86.0%): DPN at least as accurate" in lines
    assert not any(line.startswith("- select:0.2 (") for line in lines)  # not a peer of DPN
    goal = goal_check(rows, "select")
    assert goal[0] == "At least as accurate as 1 of the 2 peer points with 0.45-0.85 FLOPs, at no more FLOPs (+0.02):"
    assert "keeps 95.6% of vanilla's accuracy" in goal[-1]
    model_config = zoo.build_tiny()[0].config
    with pytest.raises(ValueError, match="--routed fastv:0.5: a fastv pyramid, which has no routers"):
        check_routed_specs(CompareOptions(base="b", train_data="t", test_data="t", routed=["fastv:0.5"]), model_config)
    with pytest.raises(ValueError, match="--routed none: no pyramid"):
        check_routed_specs(CompareOptions(base="b", train_data="t", test_data="t", routed=["none"]), model_config)
    with pytest.raises(ValueError, match="--routed fitted:0.2: also given as a training-free or fine-tuned peer"):
        check_routed_specs(CompareOptions(base="b", train_data="t", test_data="t", routed=["fitted:0.2"],
                                          fine_tuned=["fitted:0.2"]), model_config)
    with pytest.raises(ValueError, match="names a spec twice"):
        check_routed_specs(CompareOptions(base="b", train_data="t", test_data="t", routed=["select", "select"]),
                           model_config)
    check_routed_specs(CompareOptions(base="b", train_data="t", test_data="t", routed=["select:0.2", "fitted:0.2"]),
                       model_config)  # routers, no clash: accepted


def test_every_registered_spec_draws_its_own_curve_and_fine_tuned_peers_are_dashed():
    from dpn.lab.compare import FITTED, plot_styles
    from dpn.strategies.base import registered_specs

    drawn = {entry.name for entry in registered_specs() if entry.plot_style}
    assert {"dpn", "static", "projector", "random", "fastv", "pdrop", "dart", "divprune", "vispruner", "visionzip",
            "sparsevlm", "cdpruner", "select", "mixed"} <= drawn
    styles = plot_styles(drawn | {"vanilla", FITTED, "fastv (fine-tuned)", "someone else's"})
    assert len(set(styles.values())) == len(styles)  # no two curves alike
    assert list(styles)[:2] == ["vanilla", "dpn"]
    assert styles["fastv (fine-tuned)"] == styles["fastv"].rstrip("-") + "--"
    assert styles["someone else's"]  # an unregistered family takes a spare style
