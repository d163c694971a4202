"""The answering engine scores continuations as cached greedy decoding computes them."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dpn.lab.engine.answering import Answerer, Question
from dpn.lab.data.synthetic import generate_split
from dpn.lab.demo import BASE_CHECKPOINT
from dpn.lab.engine.loading import load_model

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def answerer_and_questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("answering")
    generate_split(root, "test", 2, seed=1)
    model, processor = load_model(str(BASE_CHECKPOINT), "static:1x2")  # the sequence shrinks at each stage
    questions = []
    for record in json.loads((root / "test.json").read_text()):
        text = record["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(root / record["image"]).convert("RGB")
        questions.append(Question([{"role": "user", "content": text}], [image], NEW_TOKENS))
    return Answerer(model, processor), questions


def _generated(answerer: Answerer, prepared) -> tuple[list[int], float]:
    """Greedy tokens of the stock ``generate`` (cached decoding) and their summed log-probability."""
    batch = answerer.collate([prepared.sample])
    with torch.no_grad():
        out = answerer.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
    ids = out.sequences[0, batch["input_ids"].shape[1]:].tolist()
    score = sum(float(torch.log_softmax(step[0].float(), -1)[token]) for step, token in zip(out.logits, ids))
    return ids, score


def test_the_greedy_continuation_scores_as_generate_computed_it(answerer_and_questions):
    answerer, questions = answerer_and_questions
    prepared = [answerer.prepare(q) for q in questions]
    generated = [_generated(answerer, p) for p in prepared]
    scores = answerer.loglikelihoods(prepared, [ids for ids, _ in generated])  # one batch, left-padded
    for (score, greedy), (_, expected) in zip(scores, generated):
        assert greedy
        assert score == pytest.approx(expected, abs=1e-3)
    ids = generated[0][0]
    other = ids[:-1] + [(ids[-1] + 1) % answerer.model.config.text_config.vocab_size]
    (score, greedy), = answerer.loglikelihoods(prepared[:1], [other])
    assert not greedy and score < scores[0][0]
    with pytest.raises(ValueError, match="at least one token"):
        answerer.loglikelihoods(prepared[:1], [[]])


def test_the_lmms_model_scores_its_requests_with_the_engine(answerer_and_questions):
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from dpn.lab.lmms import DpnLmms

    answerer, questions = answerer_and_questions
    lm = DpnLmms(pretrained=str(BASE_CHECKPOINT), pyramid="static:1x2", batch_size=2)
    docs = [{"image": q.images[0], "question": q.messages[0]["content"], "answer": " red"} for q in questions]
    lm.task_dict = {"t": {"test": docs}}
    requests = [SimpleNamespace(args=(doc["question"], lambda d: d["answer"], lambda d: [d["image"]], i, "t", "test"))
                for i, doc in enumerate(docs)]
    expected = answerer.loglikelihoods(
        [answerer.prepare(Question([{"role": "user", "content": "<image>\n" + d["question"]}], [d["image"]]))
         for d in docs],
        [answerer.tokenizer(" red", add_special_tokens=False)["input_ids"]] * len(docs))
    scores = lm.loglikelihood(requests)
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    assert [score for score, _ in scores] == pytest.approx([score for score, _ in expected])


def test_the_lmms_model_answers_round_after_round_as_the_engine_answers_each_round(answerer_and_questions):
    """Multi-round tasks: each round is the engine's answer to that round's question; the task sees
    the answers so far and its own round info, and ends each document when it says so."""
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from dpn.lab.lmms import DpnLmms

    answerer, questions = answerer_and_questions
    lm = DpnLmms(pretrained=str(BASE_CHECKPOINT), pyramid="static:1x2", batch_size=2)
    docs = [{"image": q.images[0], "question": q.messages[0]["content"], "rounds": rounds}
            for q, rounds in zip(questions, (2, 3))]
    lm.task_dict = {"t": {"test": docs}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((docs.index(doc), list(previous_output), round_idx, previous_round_info))
        terminal = round_idx == doc["rounds"]
        return ([doc["image"]], f"{doc['question']} (again {round_idx})", terminal, previous_output, round_idx)

    gen_kwargs = {"max_new_tokens": NEW_TOKENS, "until": []}
    requests = [SimpleNamespace(args=(doc["question"], gen_kwargs, lambda d: [d["image"]], doc_to_text, i, "t", "test"))
                for i, doc in enumerate(docs)]
    results = lm.generate_until_multi_round(requests)
    assert [len(answers) for answers in results] == [2, 3]
    for doc, answers in zip(docs, results):
        for round_index, answer in enumerate(answers):
            text = doc["question"] if round_index == 0 else f"{doc['question']} (again {round_index})"
            alone = answerer.answer([answerer.prepare(Question([{"role": "user", "content": "<image>\n" + text}],
                                                               [doc["image"]], NEW_TOKENS))])[0]
            assert answer == alone.text
    # the task saw each document's answers so far and what it returned the round before
    assert (0, results[0][:1], 1, None) in seen and (1, results[1][:2], 2, 1) in seen
    assert [entry[:3] for entry in seen if entry[0] == 0] == [(0, results[0][:1], 1), (0, results[0][:2], 2)]
    with pytest.raises(ValueError, match="answers about images"):  # a video path is not silently dropped
        lm.generate_until_multi_round([SimpleNamespace(args=("q", gen_kwargs, lambda d: ["clip.mp4"], doc_to_text, 0,
                                                             "t", "test"))])
