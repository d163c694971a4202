"""dpn as an lmms-eval model: ``lmms-eval --model dpn --model_args pretrained=DIR,pyramid=SPEC``.

lmms-eval (>= 0.7) finds this model through the ``lmms_eval.models`` entry point (``manifest``).
It is a chat-style model: each request's ``doc_to_messages`` (images and text) is answered by the
same engine as ``dpn chat`` and ``dpn serve`` (``dpn.lab.engine.answering``), ``--batch_size`` requests
at a time in one padded batch with per-sample routing. Model arguments:

- ``pretrained``: a local model directory (any family ``dpn.lab.families.zoo.load`` reads);
- ``pyramid``: ``saved`` (default: the one saved beside the model), ``none``, or a spec;
- ``max_new_tokens``: when the task does not say (default 128);
- ``stats``: a JSONL file that receives, per answered document, the visual tokens after each
  stage and the LLM FLOPs ratio (it must not exist yet: runs are never mixed).

lmms-eval's messages tasks only generate (they refuse ``loglikelihood`` output types), so lmms-eval
sends this model ``generate_until`` requests; ``loglikelihood`` scores continuations for callers that
send its arguments (the same engine, tested against cached greedy decoding), and
``generate_until_multi_round`` answers tasks that ask again after each answer (a ``doc_to_text``
that takes the round and the previous answers).

``dpn data lmms-task`` (``dpn.lab.data.lmms_task``) turns LLaVA-format data into a local task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

from dpn.lab.engine.answering import Answerer, Question
from dpn.lab.engine.messages import LMMS_IMAGE_PART, MessageError, normalise_messages, question_about
from dpn.lab.engine.loading import load_model

MODEL_ID = "dpn"
DEFAULT_MAX_NEW_TOKENS = 128


class DpnLmms(lmms):
    """A local multimodal model with (or without) a pyramid, for lmms-eval."""

    is_simple = False

    def __init__(self, pretrained: str, pyramid: str = "saved", batch_size: int | str = 1,
                 max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, stats: str | None = None,
                 device: str | None = None, **unused: Any) -> None:
        super().__init__()
        if not (Path(pretrained) / "config.json").is_file():
            raise ValueError(f"pretrained={pretrained}: no model there (a directory with config.json)")
        if str(batch_size).startswith("auto"):
            raise ValueError("dpn takes a fixed --batch_size N (not auto)")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be at least 1, got {batch_size}, {max_new_tokens}")
        self.stats_path = Path(stats) if stats else None
        if self.stats_path is not None and self.stats_path.exists():
            raise ValueError(f"stats={self.stats_path} exists: remove it or name another (runs are never mixed)")
        model, processor = load_model(pretrained, pyramid)
        if device and device != "cpu" and torch.cuda.is_available():
            model.to(device)
        self.answerer = Answerer(model, processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _question(self, request) -> tuple[Question, list[str]]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        try:
            messages, images = normalise_messages(list(doc_to_messages(self.task_dict[task][split][doc_id])),
                                                  self._image_part, LMMS_IMAGE_PART)
        except MessageError as err:
            raise ValueError(f"dpn answers about images and text; task {task}: {err}") from err
        return self._with_generation(messages, images, gen_kwargs)

    def _with_generation(self, messages: list[dict], images: list, gen_kwargs: dict | None) -> tuple[Question, list[str]]:
        """The question with the task's ``max_new_tokens`` and ``temperature``, and its stop strings."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        question = Question(messages, images, int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                            float(kwargs.get("temperature", 0.0) or 0.0))
        return question, [until] if isinstance(until, str) else list(until)

    @staticmethod
    def _image_part(part: dict, where: str):
        """lmms-eval hands an image part's picture over as ``url``."""
        if not hasattr(part.get("url"), "convert"):
            raise ValueError(f"dpn answers about images; the task's image part in {where} holds a "
                             f"{type(part.get('url')).__name__}, not an image")
        return part["url"].convert("RGB")

    @staticmethod
    def _single_turn(context: str, visuals) -> tuple[list[dict], list]:
        """One user message asking ``context`` about ``visuals`` (images; None or [] for none)."""
        images = []
        for visual in visuals or []:
            if not hasattr(visual, "convert"):
                raise ValueError(f"dpn answers about images; the task gave a {type(visual).__name__} visual")
            images.append(visual.convert("RGB"))
        return question_about(context, images), images

    @staticmethod
    def _until(text: str, until: list[str]) -> str:
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text

    def generate_until(self, requests) -> list[str]:
        answers: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="dpn answering", disable=self.rank != 0):
            chunk = requests[start:start + self.batch_size]
            questions = [self._question(request) for request in chunk]
            prepared = [self.answerer.prepare(question) for question, _ in questions]
            for request, (_, until), answer in zip(chunk, questions, self.answerer.answer(prepared)):
                text = self._until(answer.text, until)
                answers.append(text)
                self.cache_hook.add_partial("generate_until", (request.args[0], request.args[2]), text)
                _, _, _, doc_id, task, split = request.args
                self._record(task, split, doc_id, text, answer)
        return answers

    def _record(self, task: str, split: str, doc_id, text: str, answer, round_index: int | None = None) -> None:
        if self.stats_path is None:
            return
        record = {"task": task, "split": split, "doc_id": doc_id, "prediction": text,
                  "visual_tokens": answer.visual_tokens, "flops_ratio": answer.flops_ratio}
        if round_index is not None:
            record["round"] = round_index
        with self.stats_path.open("a") as sink:
            sink.write(json.dumps(record) + "\n")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each request's continuation after its context and images,
        ``--batch_size`` requests at a time. lmms-eval's messages tasks only generate; this serves
        callers that send its loglikelihood arguments (context, continuation or ``doc_to_target``,
        ``doc_to_visual``, doc id, task, split)."""
        scores: list[tuple[float, bool]] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="dpn scoring", disable=self.rank != 0):
            prepared, continuations = [], []
            for request in requests[start:start + self.batch_size]:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target(doc) if callable(target) else target
                messages, images = self._single_turn(context, doc_to_visual(doc) if doc_to_visual else None)
                prepared.append(self.answerer.prepare(Question(messages, images)))
                continuations.append(self.answerer.tokenizer(str(continuation), add_special_tokens=False)["input_ids"])
            scores += self.answerer.loglikelihoods(prepared, continuations)
        return scores

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """Each request's answers, one per round. Round 0 asks the request's context about
        ``doc_to_visual(doc)``; round ``r`` asks what the task's ``doc_to_text(doc, previous_output=
        <the answers so far>, round_idx=r, previous_round_info=<what round r-1 returned>)`` returns,
        ``(visuals, text, terminal, previous_output, round_info)``, until ``terminal``. Every round is
        a single-turn question; the requests of a ``--batch_size`` batch advance round by round
        together, in one padded batch per round."""
        results: list[list[str]] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="dpn answering rounds",
                          disable=self.rank != 0):
            chunk = [_Rounds(request, self.task_dict) for request in requests[start:start + self.batch_size]]
            questions = [self._with_generation(*self._single_turn(r.context, r.doc_to_visual(r.doc) if r.doc_to_visual
                                                                  else None), r.gen_kwargs) for r in chunk]
            while questions:
                live = [r for r in chunk if not r.done]
                prepared = [self.answerer.prepare(question) for question, _ in questions]
                for rounds, (_, until), answer in zip(live, questions, self.answerer.answer(prepared)):
                    text = self._until(answer.text, until)
                    self._record(rounds.task, rounds.split, rounds.doc_id, text, answer, len(rounds.answers))
                    rounds.answers.append(text)
                questions = []
                for rounds in live:
                    visuals, text, terminal, _, rounds.info = rounds.doc_to_text(
                        rounds.doc, previous_output=list(rounds.answers), round_idx=len(rounds.answers),
                        previous_round_info=rounds.info)
                    rounds.done = bool(terminal)
                    if not rounds.done:
                        questions.append(self._with_generation(*self._single_turn(text, visuals), rounds.gen_kwargs))
            for rounds in chunk:
                self.cache_hook.add_partial("generate_until_multi_round", (rounds.context, rounds.gen_kwargs),
                                            rounds.answers)
                results.append(rounds.answers)
        return results


class _Rounds:
    """One multi-round request as it advances: its document, the task's callables, the answers so far."""

    def __init__(self, request, task_dict) -> None:
        self.context, self.gen_kwargs, self.doc_to_visual, self.doc_to_text, self.doc_id, self.task, self.split = (
            request.args)
        self.doc = task_dict[self.task][self.split][self.doc_id]
        self.answers: list[str] = []
        self.info = None  # what doc_to_text returned for the previous round (previous_round_info)
        self.done = False


manifest = ModelManifest(model_id=MODEL_ID, chat_class_path=f"{__name__}.{DpnLmms.__name__}")
