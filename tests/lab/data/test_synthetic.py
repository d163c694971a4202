"""The synthetic fine-grained VQA benchmark."""

from __future__ import annotations

import json
import random

from dpn.lab.cli import main
from dpn.lab.data.synthetic import (
    COLORS, CORNERS, DEFAULT_FAMILIES, DIGIT_KIND, FAMILIES, answer_vocabulary, answerable, ask, generate_split,
    random_scene,
)


def test_deterministic_from_seed(tmp_path):
    a = generate_split(tmp_path / "a", "test", 12, seed=3)
    b = generate_split(tmp_path / "b", "test", 12, seed=3)
    c = generate_split(tmp_path / "c", "test", 12, seed=4)
    assert a == b and a != c
    for record in a:
        assert (tmp_path / "a" / record["image"]).read_bytes() == (tmp_path / "b" / record["image"]).read_bytes()


def test_llava_format_and_tags(tmp_path):
    records = generate_split(tmp_path, "train", 27, seed=0)
    assert json.loads((tmp_path / "train.json").read_text()) == records
    assert {r["family"] for r in records} == set(DEFAULT_FAMILIES)
    every = generate_split(tmp_path / "all", "train", 2 * len(FAMILIES), seed=0, families=list(FAMILIES))
    assert {r["family"] for r in every} == set(FAMILIES)
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] in answer_vocabulary()
        assert record["difficulty"] == FAMILIES[record["family"]][0]
        assert (tmp_path / record["image"]).is_file()


def test_answers_follow_the_scene():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng)
        small_colors = [o.color for o in scene.small]
        assert 2 <= len(set(small_colors)) <= 4
        assert not {scene.background, scene.large_color} & set(small_colors)  # every small object is visible
        assert sum(o.kind == DIGIT_KIND for o in scene.small) == 1
        assert ask(scene, "background_color", rng)[1] == scene.background
        assert ask(scene, "count_circles", rng)[1] == str(sum(o.kind == "circle" for o in scene.small))
        question, answer = ask(scene, "small_color", rng)
        corner = next(c for c in CORNERS if c in question)
        assert answer == next(o.color for o in scene.small if o.corner == corner)
        question, answer = ask(scene, "count_color", rng)
        color = next(w.rstrip("?") for w in question.split() if w.rstrip("?") in COLORS)
        assert answer == str(small_colors.count(color))
        question, answer = ask(scene, "same_color", rng)
        first, second = sorted((c for c in CORNERS if c + " " in question), key=question.index)
        by_corner = {o.corner: o.color for o in scene.small}
        assert answer == ("yes" if by_corner[first] == by_corner[second] else "no")
        if not answerable(scene, "relative"):
            continue
        question, answer = ask(scene, "relative", rng)
        first, second = [w for w in question.split() if w in COLORS]
        assert small_colors.count(first) == small_colors.count(second) == 1  # each colour names one object
        a, b = (next(o for o in scene.small if o.color == c) for c in (first, second))
        assert CORNERS[a.corner][0] != CORNERS[b.corner][0]
        assert answer == ("left" if CORNERS[a.corner][0] < CORNERS[b.corner][0] else "right")


def test_relative_questions_only_on_scenes_that_answer_them(tmp_path):
    records = generate_split(tmp_path, "test", 40, seed=1, families=["relative"])
    assert len(records) == 40 and {r["family"] for r in records} == {"relative"}
    # a scene whose colours repeat on both sides has no uniquely named pair
    scene = random_scene(random.Random(0))
    for obj, color in zip(scene.small, ["red", "red", "blue", "blue"]):
        obj.color = color
    assert not answerable(scene, "relative")


def test_count_color_answers_spread_over_counts():
    rng = random.Random(0)
    answers = [ask(random_scene(rng), "count_color", rng)[1] for _ in range(400)]
    assert {"0", "1", "2", "3"} <= set(answers)
    assert max(answers.count(a) for a in set(answers)) < 0.6 * len(answers)  # no answer dominates


def test_unknown_family_is_an_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown question families"):
        generate_split(tmp_path, "train", 2, seed=0, families=["colour_of_sky"])


def test_cli_writes_splits(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "9", "--val", "3", "--test", "4", "--turns", "3"]) == 0
    splits = {split: json.loads((tmp_path / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    assert {split: len(records) for split, records in splits.items()} == {"train": 9, "val": 3, "test": 4}
    assert all(len(r["conversations"]) == 6 for r in splits["train"])
    assert all(len(r["conversations"]) == 2 for r in splits["test"] + splits["val"])
    assert "wrote 9 train" in capsys.readouterr().out


def test_multi_turn_conversations_ask_distinct_families(tmp_path):
    records = generate_split(tmp_path, "train", 30, seed=0, families=list(FAMILIES), turns=4)
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 4
        assert turns[0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in turns[1:])  # one image per conversation
        assert all(t["value"] in answer_vocabulary() for t in turns[1::2])
        families = record["family"].split("+")
        assert len(set(families)) == 4 and set(families) <= set(FAMILIES)
        assert record["difficulty"] == "multi"
    # the families vary from image to image
    assert len({r["family"] for r in records}) > 20


def test_turns_out_of_range_is_an_error(tmp_path):
    import pytest

    for turns in (0, len(DEFAULT_FAMILIES) + 1):
        with pytest.raises(ValueError, match="turns must be between 1"):
            generate_split(tmp_path, "train", 2, seed=0, turns=turns)


def test_cli_families_option(tmp_path):
    out = tmp_path / "digits"
    assert main(["data", "synth", "--out", str(out), "--n", "4", "--val", "0", "--test", "4",
                 "--families", "read_digit,digit_side"]) == 0
    test = json.loads((out / "test.json").read_text())
    assert {r["family"] for r in test} == {"read_digit", "digit_side"}
    assert json.loads((out / "benchmark.json").read_text())["families"] == ["read_digit", "digit_side"]
    assert main(["data", "synth", "--out", str(tmp_path / "all"), "--n", "0", "--val", "0", "--test", str(len(FAMILIES)),
                 "--families", "all"]) == 0
    assert {r["family"] for r in json.loads((tmp_path / "all" / "test.json").read_text())} == set(FAMILIES)
