"""LLaVA-format data: a JSON list of ``{id, image?, conversations}`` and an image folder.

``router_token`` (for pyramids whose routers read one) is written at the end of every human turn.
``image`` is one file name or a list of them (one ``<image>`` placeholder per image in the
conversation, or none: then they go first in the first turn). ``encode_conversation`` renders a
conversation with the tokenizer's chat template and marks only the assistant's replies as
targets. Each image placeholder becomes one run of image tokens, as many as that image has visual
tokens in the model's family (``dpn.lab.families``). The collator pads a batch (right for
training, left for generation) and batches the images of the samples that have any, in order, as
the family's forward expects. Text-only samples mix freely with image samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dpn.supervision import IGNORE_INDEX
from dpn.lab.families import FamilyImages
from dpn.router_token import insert_router_tokens

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"
IMAGE_LINE = f"{IMAGE_PLACEHOLDER}\n"  # an image first in a turn: its placeholder on a line of its own
SHOWN_PROBLEMS = 20  # data problems listed in one error
# A record's optional tag (the synthetic benchmark's easy / medium / hard / multi); training batches
# carry it under this key so the trainer can log routing per difficulty (it never reaches the model).
DIFFICULTY = "difficulty"


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA ``{from, value}`` turns to chat-template ``{role, content}`` messages."""
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def encode_conversation(
    tokenizer, messages: list[dict], image_token_id: int, image_tokens: list[int], for_generation: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant replies only) of ``messages``; the i-th image token becomes
    ``image_tokens[i]`` copies.

    With ``for_generation`` the last assistant reply (if any) is dropped and the generation prompt
    is appended; labels are then all ignored.
    """
    if for_generation and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations incrementally; cannot mark answers")
        segments += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    final = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=for_generation)
    if not final.startswith(rendered):
        raise ValueError("the chat template does not render conversations incrementally; cannot mark answers")
    segments.append((final[len(rendered):], False))

    input_ids: list[int] = []
    labels: list[int] = []
    images = iter(image_tokens)
    for text, is_target in segments:
        if not text:
            continue
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            is_image = token == image_token_id
            copies = next(images, None) if is_image else 1
            if copies is None:
                raise ValueError(f"the rendered conversation has more image tokens than its {len(image_tokens)} images")
            input_ids += [token] * copies
            labels += [token if is_target and not is_image and not for_generation else IGNORE_INDEX] * copies
    if next(images, None) is not None:
        raise ValueError("the chat template dropped an image placeholder; the conversation has fewer image tokens "
                         f"than its {len(image_tokens)} images")
    return input_ids, labels


class LlavaDataset(Dataset):
    """Samples of a LLaVA-format JSON file, encoded for a model family's images (``FamilyImages``)."""

    def __init__(
        self,
        data_path: str | Path,
        image_folder: str | Path | None,
        images: FamilyImages,
        max_length: int = 2048,
        for_generation: bool = False,
        limit: int | None = None,
        router_token: str | None = None,
    ) -> None:
        data_path = Path(data_path)
        if not data_path.is_file():
            raise FileNotFoundError(f"no LLaVA-format data at {data_path}")
        try:
            records = json.loads(data_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{data_path} is not valid JSON: {err}") from err
        if not isinstance(records, list):
            raise ValueError(f"{data_path} must hold a JSON list of samples")
        self.data_path = data_path
        self.records = records[:limit] if limit else records
        self.image_folder = Path(image_folder) if image_folder is not None else data_path.parent
        self.images = images
        self.tokenizer = images.tokenizer
        self.max_length = max_length
        self.for_generation = for_generation
        self.router_token = router_token

    def __len__(self) -> int:
        return len(self.records)

    def check(self, progress: bool = False) -> None:
        """Every problem of the data at once, before any step: a ValueError listing the first
        ``SHOWN_PROBLEMS`` with their sample ids (bad turns, no answer, placeholders that do not match
        the images, images missing or unreadable)."""
        if not self.records:
            raise ValueError(f"{self.data_path} holds no samples")
        problems = []
        for index, record in enumerate(tqdm(self.records, desc="checking data", disable=not progress)):
            problems += [f"sample {_sample_id(record, index)}: {problem}" for problem in self._problems(record)]
        if problems:
            listed = "\n  ".join(problems[:SHOWN_PROBLEMS])
            more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
            raise ValueError(f"{self.data_path} has {len(problems)} problems:\n  {listed}{more}")

    def _problems(self, record: Any) -> list[str]:
        if not isinstance(record, dict):
            return [f"a sample must be a JSON object, got {type(record).__name__}"]
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                               for t in turns):
            return ["'conversations' must be a non-empty list of {from, value} turns"]
        problems = [f"unknown speaker {t.get('from')!r}" for t in turns if t.get("from") not in ROLES]
        if not any(ROLES.get(t.get("from")) == "assistant" for t in turns):
            problems.append("no answer turn (from 'gpt' or 'assistant'): nothing to learn or compare with")
        try:
            files = image_files(record)
        except ValueError as err:
            return problems + [str(err).split(": ", 1)[-1]]
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if placeholders and placeholders != len(files):
            problems.append(f"{placeholders} <image> placeholders but {len(files)} images")
        for name in files:
            try:
                Image.open(self.image_folder / name).close()  # reads the header: it exists and is an image
            except (OSError, ValueError) as err:
                problems.append(f"cannot read image {self.image_folder / name}: {err}")
        return problems

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        sample = _sample_id(record, index)
        messages = to_messages(record["conversations"])
        files = image_files(record)
        try:
            messages = with_image_placeholders(messages, len(files))  # before reading any image
            input_ids, labels, encoded = encode_messages(
                self.images, messages, [self._open(path) for path in files], self.for_generation,
                self.router_token)
        except ValueError as err:
            raise ValueError(f"sample {sample}: {err}") from err
        tokens = encoded.tokens if encoded is not None else []
        if len(input_ids) > self.max_length:
            if input_ids[: self.max_length].count(self.images.image_token_id) != sum(tokens):
                raise ValueError(
                    f"sample {sample} is {len(input_ids)} tokens; max_length {self.max_length} "
                    "would cut its image: raise max_length"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        difficulty = record.get(DIFFICULTY)
        return {"input_ids": input_ids, "labels": labels, "images": encoded,
                DIFFICULTY: difficulty if isinstance(difficulty, str) else None}

    def _open(self, name: str) -> Image.Image:
        path = self.image_folder / name
        try:
            return Image.open(path).convert("RGB")
        except (OSError, FileNotFoundError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err


def with_image_placeholders(messages: list[dict], images: int) -> list[dict]:
    """``messages`` with one ``<image>`` per image: as they are, or (with none) all first in the first turn."""
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        return [{**messages[0], "content": IMAGE_LINE * images + messages[0]["content"]}, *messages[1:]]
    if placeholders != images:
        raise ValueError(f"{placeholders} <image> placeholders but {images} images")
    return messages


def encode_messages(images: FamilyImages, messages: list[dict], pictures: list[Image.Image], for_generation: bool,
                    router_token: str | None = None) -> tuple[list[int], list[int], Any]:
    """Token ids, labels and encoded images (``SampleImages`` or None) of chat ``messages`` whose
    ``<image>`` placeholders stand for ``pictures`` (none: the pictures go first in the first turn)."""
    messages = with_image_placeholders(messages, len(pictures))
    if images.placeholder != IMAGE_PLACEHOLDER:
        messages = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, images.placeholder)} for m in messages]
    if router_token is not None:
        messages = insert_router_tokens(messages, router_token)
    encoded = images.encode(pictures) if pictures else None
    input_ids, labels = encode_conversation(images.tokenizer, messages, images.image_token_id,
                                            encoded.tokens if encoded is not None else [], for_generation)
    return input_ids, labels, encoded


def _sample_id(record: Any, index: int) -> Any:
    return record.get("id", index) if isinstance(record, dict) else index


def image_files(record: dict) -> list[str]:
    """The image file names of a record: ``image`` as one name, a list of names, or absent/null."""
    image = record.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"sample {record.get('id')}: 'image' must be a file name or a list of file names, got {image!r}")
    return names


@dataclass
class LlavaCollator:
    """Pads a list of dataset items into a model batch; ``images`` batches their images."""

    pad_token_id: int
    images: FamilyImages
    padding_side: str = "right"
    with_labels: bool = True

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.tensor(item["input_ids"])
            labels[row, span] = torch.tensor(item["labels"])
            attention_mask[row, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **self.images.token_inputs(input_ids)}
        if self.with_labels:
            batch["labels"] = labels
            if any(item.get(DIFFICULTY) for item in items):
                batch[DIFFICULTY] = [item.get(DIFFICULTY) for item in items]
        images = [item["images"] for item in items if item["images"] is not None]
        if images:
            batch.update(self.images.collate(images))
        return batch
