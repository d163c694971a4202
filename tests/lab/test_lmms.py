"""lmms-eval runs dpn as a plugin model on a local task and scores what ``dpn eval`` scores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from dpn.lab.cli import main  # noqa: E402
from dpn.lab.data.synthetic import generate_split  # noqa: E402
from dpn.lab.evaluate import EvalOptions, evaluate  # noqa: E402
from dpn.lab.demo import BASE_CHECKPOINT as SHIPPED_BASE  # noqa: E402

SAMPLES = 12
PYRAMID = "static:1x2"  # a trained base with a pyramid that changes answers: accuracy is neither 0 nor 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    generate_split(root, "test", SAMPLES, seed=3)
    return root


@pytest.mark.slow
def test_lmms_eval_scores_what_dpn_eval_scores(data, tmp_path):
    summary = evaluate(EvalOptions(model=str(SHIPPED_BASE), data=str(data / "test.json"), pyramid=PYRAMID,
                                   output_dir=str(tmp_path / "eval"), progress=False, plot=False,
                                   measure_latency=False))
    expected = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert main(["data", "lmms-task", "--data", str(data / "test.json"), "--out", str(tmp_path / "task")]) == 0
    stats = tmp_path / "stats.jsonl"
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "dpn",
               "--model_args", f"pretrained={SHIPPED_BASE},pyramid={PYRAMID},stats={stats}", "--batch_size", "5",
               "--include_path", str(tmp_path / "task"), "--tasks", "dpn_synth", "--output_path", str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    written = list((tmp_path / "out").rglob("*_results.json"))
    # lmms-eval exits 0 even when it fails part way (filelock 4 did that to 0.7.3): the results must be there
    assert len(written) == 1, f"lmms-eval exited 0 but wrote {len(written)} results files; its log:\n{run.stderr[-3000:]}"
    results, = written
    accuracy = json.loads(results.read_text())["results"]["dpn_synth"]["accuracy,none"]
    assert accuracy == pytest.approx(summary["overall"]["accuracy"])
    assert 0 < accuracy < 1
    rows = sorted((json.loads(line) for line in stats.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["prediction"] for r in rows] == [e["prediction"] for e in expected]
    assert [r["visual_tokens"] for r in rows] == [e["visual_tokens"] for e in expected]
    assert [r["flops_ratio"] for r in rows] == pytest.approx([e["flops_ratio"] for e in expected])


def test_bad_model_arguments_are_clear_errors(data, tmp_path):
    from dpn.lab.lmms import DpnLmms

    with pytest.raises(ValueError, match="no model there"):
        DpnLmms(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="not auto"):
        DpnLmms(pretrained=str(SHIPPED_BASE), batch_size="auto")
    (tmp_path / "stats.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="runs are never mixed"):
        DpnLmms(pretrained=str(SHIPPED_BASE), stats=str(tmp_path / "stats.jsonl"))


def test_a_task_takes_one_question_per_sample(data, tmp_path):
    records = json.loads((data / "test.json").read_text())
    records[0]["conversations"] += records[0]["conversations"]
    (tmp_path / "multi.json").write_text(json.dumps(records))
    assert main(["data", "lmms-task", "--data", str(tmp_path / "multi.json"), "--out", str(tmp_path / "t")]) == 2
