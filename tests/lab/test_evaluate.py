"""Evaluation: greedy answers, metrics per difficulty, incremental results that resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny_dpn

from dpn.lab.families import zoo
from dpn.lab.cli import main
from dpn.lab.engine.console import PIPED_WIDTH, console
from dpn.lab.families import family_images
from dpn.lab.data.llava import LlavaCollator, LlavaDataset
from dpn.lab.data.synthetic import generate_split
from dpn.lab.engine.answering import Answerer, Prepared
from dpn.lab.evaluate import EvalOptions, evaluate, normalize_answer, summarize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate_split(root, "test", 12, seed=0)
    model, processor = save_tiny_dpn(root / "model")
    return root, model, processor


@pytest.mark.parametrize("raw, expected", [(" Red.", "red"), ("The circle!", "circle"), ("3", "3"), ("top  Left", "top left")])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_the_answerer_eval_uses_matches_generate(setup):
    root, model, processor = setup
    dataset = LlavaDataset(root / "test.json", None, family_images(model.config, processor), for_generation=True)
    samples = [dataset[i] for i in range(4)]
    batch = LlavaCollator(processor.tokenizer.pad_token_id, dataset.images, "left", with_labels=False)(samples)
    eos = processor.tokenizer.eos_token_id
    answers = Answerer(model, processor).answer([Prepared.encoded(sample, 6) for sample in samples])
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    new = generated[:, batch["input_ids"].shape[1]:].tolist()
    assert [a.token_ids for a in answers] == [row[:len(a.token_ids)] for a, row in zip(answers, new)]
    assert all(len(a.experts) == 2 and a.finish_reason in ("stop", "length") for a in answers)


def test_evaluate_writes_results_and_resumes(setup, tmp_path):
    root, _, _ = setup
    options = dict(model=str(root / "model"), data=str(root / "test.json"), output_dir=str(tmp_path),
                   batch_size=4, max_new_tokens=3, progress=False)
    first = evaluate(EvalOptions(**options, limit=8))
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and first["overall"]["n"] == 8
    assert first["pyramid"]["stages"][0]["layer"] == 1 and first["prefill_latency_ratio"] > 0
    assert (tmp_path / "routing.png").stat().st_size > 0
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:10])  # a line cut by a kill
    second = evaluate(EvalOptions(**options))
    lines_after = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert lines_after[:8] == lines  # earlier results kept, only the rest evaluated
    assert second["overall"]["n"] == 12 and len({json.loads(l)["id"] for l in lines_after if l.endswith("}")}) == 12
    assert set(second["difficulty"]) <= {"easy", "medium", "hard"}
    assert len(second["overall"]["visual_tokens"]) == 3 and 0 < second["overall"]["flops_ratio"] <= 1


def test_evaluate_without_the_pyramid(setup, tmp_path):
    root, _, _ = setup
    summary = evaluate(EvalOptions(model=str(root / "model"), data=str(root / "test.json"), output_dir=str(tmp_path),
                                   pyramid="none", limit=4, max_new_tokens=2, progress=False))
    assert summary["pyramid"] is None and "visual_tokens" not in summary["overall"]


def test_evaluate_can_override_the_probability_scale(setup, tmp_path):
    root, _, _ = setup
    options = dict(model=str(root / "model"), data=str(root / "test.json"), limit=4, max_new_tokens=2,
                   measure_latency=False, plot=False, progress=False)
    scaled = evaluate(EvalOptions(**options, output_dir=str(tmp_path / "scaled")))
    unscaled = evaluate(EvalOptions(**options, output_dir=str(tmp_path / "unscaled"), probability_scale="train_only"))
    # The override is an inference setting of the module: the config stays the trained one.
    assert scaled["pyramid"]["strategy"]["probability_scale"] == "value" and "inference" not in scaled
    assert unscaled["pyramid"] == scaled["pyramid"] and unscaled["inference"]["probability_scale"] == "train_only"
    assert (root / "model" / "pyramid_config.json").read_text().count("train_only") == 0  # the saved file is untouched
    with pytest.raises(ValueError, match="applies to a DPN"):
        evaluate(EvalOptions(**options, output_dir=str(tmp_path / "static"), pyramid="static:2x2",
                             probability_scale="train_only"))


def test_forced_experts_route_every_sample_and_are_checked(setup, tmp_path, capsys):
    root, _, _ = setup
    options = dict(model=str(root / "model"), data=str(root / "test.json"), limit=4, max_new_tokens=2,
                   measure_latency=False, plot=False, progress=False)
    forced = evaluate(EvalOptions(**options, output_dir=str(tmp_path / "forced"), force_experts=[2, 1]))
    predictions = [json.loads(line) for line in (tmp_path / "forced" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["experts"] == [2, 1] and p["visual_tokens"] == [144, 36, 18] for p in predictions)
    kept = evaluate(EvalOptions(**options, output_dir=str(tmp_path / "kept"), force_experts=[0, 0]))
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "test.json"), "--output",
                 str(tmp_path / "kept-positions"), "--limit", "2", "--no-latency", "--positions", "keep"]) == 0
    summary = json.loads((tmp_path / "kept-positions" / "summary.json").read_text())
    assert summary["pyramid"]["positions"] == "keep" and kept["pyramid"]["positions"] == "renumber"
    assert kept["overall"]["flops_ratio"] == pytest.approx(1.0) and forced["overall"]["flops_ratio"] < 0.9
    for flags, message in ((["0"], "one expert per stage"), (["0", "3"], "experts 0..2"),
                           (["0", "0", "--pyramid", "none"], "needs a model with a pooling pyramid")):
        assert main(["eval", "--model", str(root / "model"), "--data", str(root / "test.json"), "--output",
                     str(tmp_path / "bad"), "--force-experts", *flags]) == 2
        assert message in capsys.readouterr().err


def test_summarize_counts_per_difficulty():
    results = [
        {"difficulty": "easy", "family": "a", "correct": True, "visual_tokens": [144, 36], "flops_ratio": 0.5},
        {"difficulty": "hard", "family": "b", "correct": False, "visual_tokens": [144, 144], "flops_ratio": 1.0},
        {"difficulty": "hard", "family": "b", "correct": True, "visual_tokens": [144, 72], "flops_ratio": 0.75},
    ]
    summary = summarize(results)
    assert summary["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["difficulty"]["hard"]["visual_tokens"] == [144, 108] and summary["family"]["b"]["n"] == 2


# ------------------------------------------------------------------------------- reliability
def test_results_of_another_run_are_never_mixed(setup, tmp_path, capsys):
    root, _, _ = setup
    base = ["eval", "--model", str(root / "model"), "--data", str(root / "test.json"), "--output", str(tmp_path),
            "--limit", "2", "--max-new-tokens", "2", "--no-latency"]
    assert main(base) == 0
    assert main(base[:-2] + ["4", "--no-latency"]) == 2  # longer answers: another run
    assert "holds the results of another run (max_new_tokens: 2 then, 4 now)" in capsys.readouterr().err
    assert main([*base, "--pyramid", "none"]) == 2
    err = capsys.readouterr().err
    assert "pyramid: {" in err and "None now" in err and "--overwrite" in err
    assert main([*base, "--limit", "3"]) == 0  # same run, more samples: resumes
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 3
    assert main([*base, "--pyramid", "none", "--overwrite"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pyramid"] is None and "flops_ratio" not in summary["overall"] and summary["overall"]["n"] == 2
    assert all("flops_ratio" not in json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines())
    (tmp_path / "run.json").unlink()  # predictions nobody can vouch for
    assert main(base) == 2 and "without a run.json" in capsys.readouterr().err


def test_other_weights_in_the_same_folder_are_another_run(setup, tmp_path, capsys):
    root, model, processor = setup
    copy = tmp_path / "model"
    zoo.save_tiny(model, processor, copy)
    args = ["eval", "--model", str(copy), "--data", str(root / "test.json"), "--output", str(tmp_path / "out"),
            "--limit", "1", "--max-new-tokens", "1", "--no-latency", "--pyramid", "none"]
    assert main(args) == 0
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1  # a "fine-tuned" model saved over the first
    zoo.save_tiny(model, processor, copy)
    assert main(args) == 2 and "weights:" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--budget", "1.5"], "--budget is a fraction"),
])
def test_numbers_are_checked_by_flag_name(setup, tmp_path, capsys, flags, message):
    root, _, _ = setup
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "test.json"),
                 "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_every_data_problem_is_listed_before_anything_runs(setup, tmp_path, capsys):
    root, _, _ = setup
    good = json.loads((root / "test.json").read_text())[0]
    bad = [
        {**good, "id": "missing", "image": "nowhere.png"},
        {**good, "id": "no-answer", "conversations": good["conversations"][:1]},
        {**good, "id": "two-tags", "conversations": [{"from": "human", "value": "<image> <image> hi"},
                                                      {"from": "gpt", "value": "no"}]},
        {**good, "id": "robot", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "no"}]},
    ]
    (root / "bad.json").write_text(json.dumps([good, *bad]))
    (root / "empty.json").write_text("[]")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "bad.json"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has 4 problems" in err
    for expected in ("sample missing: cannot read image", "sample no-answer: no answer turn",
                     "sample two-tags: 2 <image> placeholders but 1 images", "sample robot: unknown speaker 'robot'"):
        assert expected in err, expected
    assert not (out / "predictions.jsonl").exists()
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "empty.json"), "--output", str(out)]) == 2
    assert "holds no samples" in capsys.readouterr().err


def test_the_table_prints_whole_rows_to_a_pipe_and_all_once(setup, tmp_path, capsys):
    root, _, _ = setup
    untagged = [{k: v for k, v in r.items() if k not in ("difficulty", "family")}
                for r in json.loads((root / "test.json").read_text())[:2]]
    (root / "untagged.json").write_text(json.dumps(untagged))
    assert main(["eval", "--model", str(root / "model"), "--data", str(root / "untagged.json"),
                 "--output", str(tmp_path), "--max-new-tokens", "1", "--no-latency"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["all"]  # one row, not wrapped, not repeated
    assert console().width == PIPED_WIDTH  # not a terminal here: wide tables are not wrapped at 80 columns
