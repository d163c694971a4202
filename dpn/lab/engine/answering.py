"""Answer a batch of conversations at once, each with its own routing, limits and temperature.

The engine behind ``dpn chat``, ``dpn serve`` and the lmms-eval plugin: conversations (chat
messages whose ``<image>`` placeholders stand for their images) are encoded as ``dpn eval``
encodes its samples, padded on the left into one batch, prefilled once (the pyramid routes each
sample on its own) and decoded with the KV cache. Each answer carries what the pyramid did to it.
``loglikelihoods`` scores given continuations instead (multiple-choice evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from dpn.lab.families import family_images
from dpn.lab.data.llava import LlavaCollator, encode_messages
from dpn.supervision import IGNORE_INDEX
from dpn.lab.engine.decoding import decode, prompt_positions
from dpn.lab.engine.pyramids import prompt_router_token

DEFAULT_MAX_IMAGES = 4  # images in one conversation


@dataclass
class Question:
    """One conversation to answer: chat ``messages`` (``{role, content}`` with string content)."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy


@dataclass
class Prepared:
    """A question encoded for the model (``Answerer.prepare``)."""

    question: Question
    sample: dict[str, Any]

    @classmethod
    def encoded(cls, sample: dict[str, Any], max_new_tokens: int) -> Prepared:
        """A sample already encoded as ``prepare`` encodes (a row of ``dpn eval``'s dataset), to be
        answered greedily with at most ``max_new_tokens``."""
        return cls(Question(messages=[], max_new_tokens=max_new_tokens), sample)

    @property
    def prompt_tokens(self) -> int:
        return len(self.sample["input_ids"])

    @property
    def has_images(self) -> bool:
        return self.sample.get("images") is not None


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)
    prompt_tokens: int
    visual_tokens: list[int] | None  # before the first stage, then after each (None: no image or no pyramid)
    flops_ratio: float | None  # LLM prefill FLOPs against the model without its pyramid (None: no pyramid)
    first_token_seconds: float  # the batch's prefill, images included
    experts: list[int] | None = None  # per stage, the expert the pyramid took (-1: none); None: no pyramid


class Answerer:
    """Answers questions with ``model`` and its ``processor`` (as ``dpn.lab.families.zoo.load`` returns them)."""

    def __init__(self, model, processor, max_images: int = DEFAULT_MAX_IMAGES) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        self.images = family_images(model.config, processor)
        self.router_token = prompt_router_token(model, self.tokenizer)
        self.collate = LlavaCollator(self.tokenizer.pad_token_id, self.images, padding_side="left", with_labels=False)
        self.max_images = max_images
        text_config = getattr(model.config, "text_config", model.config)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)

    def prepare(self, question: Question) -> Prepared:
        """``question`` encoded; a ValueError says what is wrong with it (images, length, limits)."""
        if question.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {question.max_new_tokens}")
        if question.temperature < 0:
            raise ValueError(f"temperature must be at least 0, got {question.temperature}")
        if len(question.images) > self.max_images:
            raise ValueError(f"{len(question.images)} images in one conversation; at most {self.max_images}")
        if not question.messages or question.messages[-1]["role"] != "user":
            raise ValueError("the conversation must end with a user message")
        input_ids, labels, encoded = encode_messages(self.images, question.messages, question.images,
                                                     for_generation=True, router_token=self.router_token)
        total = len(input_ids) + question.max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"the prompt is {len(input_ids)} tokens (images included); with max_new_tokens "
                             f"{question.max_new_tokens} that is {total}, more than the model's "
                             f"{self.max_positions} positions")
        return Prepared(question, {"input_ids": input_ids, "labels": labels, "images": encoded})

    @torch.no_grad()
    def answer(self, prepared: list[Prepared], on_token: Callable[[int, int], None] | None = None,
               generator: torch.Generator | None = None, **prefill_arguments: Any) -> list[Answer]:
        """Answers to ``prepared`` questions, run as one batch. ``on_token(row, token_id)`` sees each
        new token of each row as it is decoded (for streaming). ``prefill_arguments`` go to the
        prefill only (``force_experts``: decoding steps route nothing)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collate([p.sample for p in prepared]).items()}
        questions = [p.question for p in prepared]
        start = time.perf_counter()
        positions = prompt_positions(self.model, batch)
        prefill = self.model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1, **prefill_arguments)
        prefill.logits[:, -1, :1].tolist()  # waits for the prefill
        first_token_seconds = time.perf_counter() - start

        def each_step(tokens: torch.Tensor, live: torch.Tensor) -> None:
            for row, (token, alive) in enumerate(zip(tokens.tolist(), live.tolist())):
                if alive:
                    on_token(row, token)

        tokens = decode(self.model, prefill, batch["attention_mask"], positions,
                        [q.max_new_tokens for q in questions], self.tokenizer.eos_token_id,
                        self.tokenizer.pad_token_id, [q.temperature for q in questions], generator,
                        on_step=each_step if on_token is not None else None)
        routing = getattr(prefill, "routing", None)
        return [self._answer(p, row, tokens[row].tolist(), routing, first_token_seconds)
                for row, p in enumerate(prepared)]

    @torch.no_grad()
    def loglikelihoods(self, prepared: list[Prepared], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """For each prepared question and continuation (token ids), as one batch: the log-probability
        of the continuation after the question's generation prompt, and whether greedy decoding
        would produce it. Pooling touches only visual tokens, so with left padding the last tokens of
        every row are its continuation, whatever the pyramid kept before them."""
        if any(not ids for ids in continuations):
            raise ValueError("a continuation must have at least one token")
        samples = [{**p.sample, "input_ids": p.sample["input_ids"] + ids,
                    "labels": p.sample["labels"] + [IGNORE_INDEX] * len(ids)} for p, ids in zip(prepared, continuations)]
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collate(samples).items()}
        logits = self.model(**batch, use_cache=False).logits.float()
        results = []
        for row, ids in enumerate(continuations):
            scores = torch.log_softmax(logits[row, -len(ids) - 1:-1], dim=-1)
            targets = torch.tensor(ids, device=scores.device)
            results.append((float(scores.gather(1, targets[:, None]).sum()),
                            bool((scores.argmax(-1) == targets).all())))
        return results

    def _answer(self, prepared: Prepared, row: int, tokens: list[int], routing, first_token_seconds: float) -> Answer:
        eos = self.tokenizer.eos_token_id
        generated = tokens[:prepared.question.max_new_tokens]  # then padding, which may be the eos token
        ended = eos in generated
        if ended:
            generated = generated[:generated.index(eos) + 1]
        text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
        return Answer(
            text=text,
            token_ids=generated,
            finish_reason="stop" if ended else "length",
            prompt_tokens=prepared.prompt_tokens,
            visual_tokens=routing.visual_tokens[row].tolist() if routing is not None and prepared.has_images
            else None,
            flops_ratio=float(routing.flops_ratio[row]) if routing is not None else None,
            first_token_seconds=first_token_seconds,
            experts=routing.experts[row].tolist() if routing is not None else None,
        )
