"""``dpn chat``: the same answers as ``dpn eval``, with what each answer cost."""

from __future__ import annotations

import io
import json

import pytest
from helpers import save_tiny_dpn

from dpn.lab.chat import ChatSession, run_chat
from dpn.lab.cli import main
from dpn.lab.data.synthetic import generate_split
from dpn.lab.engine.loading import load_model
from dpn.lab.evaluate import EvalOptions, evaluate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    generate_split(root, "test", 3, seed=0)
    save_tiny_dpn(root / "model")
    return root


def _question(root, index: int) -> tuple[str, str]:
    record = json.loads((root / "test.json").read_text())[index]
    return str(root / record["image"]), record["conversations"][0]["value"].replace("<image>", "").strip()


@pytest.mark.parametrize("pyramid", ["saved", "none"])
def test_chat_answers_as_dpn_eval_does(setup, tmp_path, pyramid):
    summary = evaluate(EvalOptions(model=str(setup / "model"), data=str(setup / "test.json"), pyramid=pyramid,
                                   output_dir=str(tmp_path / "eval"), max_new_tokens=5, progress=False, plot=False,
                                   measure_latency=False))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    model, processor = load_model(str(setup / "model"), pyramid)
    session = ChatSession(model, processor, max_new_tokens=5)
    for index, prediction in enumerate(predictions):
        image, question = _question(setup, index)
        session.show(image)
        answer = session.ask(question)
        assert answer.text == prediction["prediction"]
        assert answer.first_token_seconds > 0
        if pyramid == "none":
            assert answer.visual_tokens is None and answer.flops_ratio is None
        else:
            assert answer.visual_tokens == prediction["visual_tokens"]
            assert answer.flops_ratio == pytest.approx(prediction["flops_ratio"])
    assert summary["overall"]["n"] == len(predictions) == 3


def test_one_shot_prompt_prints_the_answer_and_its_cost(setup, capsys):
    image, question = _question(setup, 0)
    assert main(["chat", "--model", str(setup / "model"), "--image", image, "--prompt", question,
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "visual tokens 144 -> " in out[1] and "LLM FLOPs ratio" in out[1]
    assert "time to first token" in out[1]


def test_the_loop_keeps_the_conversation_and_takes_commands(setup):
    image, question = _question(setup, 0)
    other, _ = _question(setup, 1)
    lines = [question, "and again?", "/reset", question, f"/image {other}", "/image missing.png", "/what", "", question]
    stdout = io.StringIO()
    assert run_chat(str(setup / "model"), image=image, max_new_tokens=3, stdin=io.StringIO("\n".join(lines) + "\n"),
                    stdout=stdout) == 0
    out = stdout.getvalue().splitlines()
    answers = [out[i - 1] for i, line in enumerate(out) if line.startswith("  [")]
    assert len(answers) == 4
    assert answers[0] == answers[2]  # /reset: the same question in a new conversation, the same answer
    assert any("cannot read image missing.png" in line for line in out)
    assert any("unknown command '/what'" in line for line in out)


def test_bad_chat_arguments_are_clear_errors(setup, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["chat", "--model", str(setup / "model"), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    assert main(["chat", "--model", str(setup / "model"), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err
