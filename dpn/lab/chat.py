"""``dpn chat``: talk to a model (with or without a pyramid) about an image, and see what it cost.

Each answer is greedy (as ``dpn eval`` answers) and comes with the visual tokens each stage kept,
the LLM prefill FLOPs ratio against the same model without the pyramid, and the time to the first
token (the prefill, images included). The conversation keeps its turns until ``/reset`` or a new
``/image``; the image sits in the first turn.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from dpn.api import has_pyramid
from dpn.lab.engine.answering import Answer, Answerer, Question
from dpn.lab.engine.loading import load_model

DEFAULT_MAX_NEW_TOKENS = 128
COMMANDS_HELP = "/image PATH: talk about another image (starts over) | /reset: start over | /quit (or end of input)"


def stats(answer: Answer) -> str:
    """What an answer cost, in one line."""
    parts = []
    if answer.visual_tokens is not None:
        parts.append("visual tokens " + " -> ".join(str(v) for v in answer.visual_tokens))
    if answer.flops_ratio is not None:
        parts.append(f"LLM FLOPs ratio {answer.flops_ratio:.3f}")
    parts.append(f"time to first token {answer.first_token_seconds * 1e3:.0f} ms")
    return " | ".join(parts)


@dataclass
class ChatSession:
    """A conversation with ``model`` (loaded with its processor by ``load_model``)."""

    model: torch.nn.Module
    processor: object
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    image: Image.Image | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.answerer = Answerer(self.model, self.processor)

    def show(self, path: str | Path) -> None:
        """Talk about the image at ``path`` from now on (a new conversation)."""
        try:
            self.image = Image.open(path).convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        self.messages = []

    def reset(self) -> None:
        self.messages = []

    def ask(self, question: str) -> Answer:
        messages = [*self.messages, {"role": "user", "content": question}]
        pictures = [self.image] if self.image is not None else []
        prepared = self.answerer.prepare(Question(messages, pictures, self.max_new_tokens))
        answer, = self.answerer.answer([prepared])
        self.messages = [*messages, {"role": "assistant", "content": answer.text}]
        return answer


def run_chat(model_dir: str, pyramid: str = "saved", image: str | None = None, prompt: str | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> int:
    """One answer to ``prompt``, or a loop over the lines of ``stdin`` (see ``COMMANDS_HELP``)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, processor = load_model(model_dir, pyramid)
    session = ChatSession(model, processor, max_new_tokens)
    if image is not None:
        session.show(image)
    if not has_pyramid(model):
        print("(no pyramid: every visual token is kept)", file=stdout)

    def answer(question: str) -> None:
        reply = session.ask(question)
        print(reply.text, file=stdout)
        print(f"  [{stats(reply)}]", file=stdout, flush=True)

    if prompt is not None:
        answer(prompt)
        return 0
    interactive = stdin.isatty()
    if interactive:
        print(COMMANDS_HELP, file=stdout)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            session.reset()
        elif line.startswith("/image"):
            try:
                session.show(line.partition(" ")[2].strip())
            except ValueError as err:
                print(f"dpn chat: {err}", file=stdout)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {COMMANDS_HELP}", file=stdout)
        else:
            answer(line)
