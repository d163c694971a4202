"""``dpn paths``: every routing path forced, the oracle frontier it allows and the routers' regret."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_dpn

from dpn.lab.cli import main
from dpn.lab.data.synthetic import generate_split
from dpn.lab.paths import (
    PathsOptions, difficulty_oracle_points, efficient, oracle_accuracy_at, oracle_frontier, oracle_points,
)


def test_the_oracle_takes_each_samples_cheapest_correct_path_and_trades_by_price():
    correct = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # (paths, samples)
    flops = torch.tensor([[1.0] * 3, [0.5] * 3, [0.4] * 3])
    points = {p["price"]: p for p in oracle_points(correct, flops)}
    assert points[0.0]["accuracy"] == 1.0 and points[0.0]["flops_ratio"] == pytest.approx((0.5 + 0.4 + 0.4) / 3)
    assert points[100.0]["accuracy"] == pytest.approx(2 / 3) and points[100.0]["flops_ratio"] == pytest.approx(0.4)
    frontier = oracle_frontier(correct, flops)
    assert [(round(p["flops_ratio"], 3), round(p["accuracy"], 3)) for p in frontier] == [(0.4, 0.667), (0.433, 1.0)]
    assert oracle_accuracy_at(frontier, 0.42) == pytest.approx(2 / 3) and oracle_accuracy_at(frontier, 0.3) == 0.0
    assert efficient([{"flops_ratio": 0.5, "accuracy": 0.9}, {"flops_ratio": 0.6, "accuracy": 0.8}]) == \
        [{"flops_ratio": 0.5, "accuracy": 0.9}]


def test_the_difficulty_oracle_sends_every_question_of_a_difficulty_down_one_path():
    # Two easy samples, each right on a different cheap path; one hard sample right only on the full path.
    correct = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (paths, samples)
    flops = torch.tensor([[1.0] * 3, [0.5] * 3, [0.4] * 3])
    difficulty = ["easy", "easy", "hard"]
    points = {p["price"]: p for p in difficulty_oracle_points(correct, flops, difficulty)}
    assert points[0.0]["accuracy"] == 1.0 and points[0.0]["flops_ratio"] == pytest.approx(1.0)  # no cheap path fits both
    # At price 1 the easy pair's mean score is 0.0 on the full path, 0.0 on path 1, 0.1 on path 2; hard keeps the full.
    assert points[1.0]["accuracy"] == pytest.approx(2 / 3) and points[1.0]["flops_ratio"] == pytest.approx(0.6)
    per_sample = {p["price"]: p for p in oracle_points(correct, flops)}
    assert per_sample[0.0]["flops_ratio"] == pytest.approx((0.5 + 0.4 + 1.0) / 3)  # it knows each sample's lucky path
    for price, point in points.items():  # the per-sample choice is never worse at the price it optimises
        assert per_sample[price]["accuracy"] - price * per_sample[price]["flops_ratio"] >= \
            point["accuracy"] - price * point["flops_ratio"] - 1e-9


def test_every_path_is_evaluated_and_the_routers_are_judged(tmp_path, capsys):
    generate_split(tmp_path, "test", 6, seed=0)
    save_tiny_dpn(tmp_path / "model")
    code = main(["paths", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "test.json"),
                 "--output", str(tmp_path / "paths"), "--batch-size", "3"])
    assert code == 0 and "oracle frontier" in capsys.readouterr().out
    report = json.loads((tmp_path / "paths" / "paths.json").read_text())
    mode, = report["modes"]
    assert mode["mode"] == "keep, scale none" and len(mode["rows"]) == 9
    rows = {tuple(row["path"]): row for row in mode["rows"]}
    assert rows[(0, 0)]["flops_ratio"] == pytest.approx(1.0) and rows[(2, 2)]["flops_ratio"] < rows[(1, 1)]["flops_ratio"]
    predictions = (tmp_path / "paths" / "keep-none" / "2-1" / "predictions.jsonl").read_text().splitlines()
    assert all(json.loads(line)["experts"] == [2, 1] for line in predictions)
    router = mode["router"]  # the saved routers, evaluated unforced, never beat the oracle at their FLOPs
    assert router["regret"] >= 0 and router["oracle_accuracy"] >= router["accuracy"]
    assert router["difficulty_regret"] == pytest.approx(router["difficulty_oracle_accuracy"] - router["accuracy"])
    assert "Difficulty oracle (one path per difficulty): " in (tmp_path / "paths" / "PATHS.md").read_text()
    assert (tmp_path / "paths" / "PATHS.md").read_text().count("| path |") == 1
    assert (tmp_path / "paths" / "paths.png").stat().st_size > 1000


def test_bad_modes_and_strategies_without_paths_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--positions takes"):
        PathsOptions(model="m", data="d", output_dir="o", positions=["spiral"])
    generate_split(tmp_path, "test", 2, seed=0)
    save_tiny_dpn(tmp_path / "model")
    for pyramid, message in (("fastv:0.5", "routing paths exist for pooling pyramids"),
                             ("static:2x2", "--scale value scales pooled tokens by a DPN router")):
        assert main(["paths", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "test.json"), "--output",
                     str(tmp_path / "out"), "--pyramid", pyramid, "--scale", "value"]) == 2
        assert message in capsys.readouterr().err
