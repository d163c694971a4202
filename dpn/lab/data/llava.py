"""LLaVA-format data: a JSON list of ``{id, image?, conversations}`` and an image folder.

``encode_conversation`` renders a conversation with the tokenizer's chat template and marks only
the assistant's replies as targets. Each ``<image>`` placeholder becomes one run of image tokens of
the model's grid size. The collator pads a batch (right for training, left for generation) and
stacks the pixel values of the samples that have an image, in order, as LLaVA's forward expects.
Text-only samples mix freely with image samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


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
    tokenizer, messages: list[dict], image_token_id: int, image_tokens: int, for_generation: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant replies only) of ``messages``.

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
    for text, is_target in segments:
        if not text:
            continue
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            copies = image_tokens if token == image_token_id else 1
            input_ids += [token] * copies
            labels += [token if is_target and copies == 1 and not for_generation else IGNORE_INDEX] * copies
    return input_ids, labels


class LlavaDataset(Dataset):
    """Samples of a LLaVA-format JSON file, encoded for a given processor and visual grid size."""

    def __init__(
        self,
        data_path: str | Path,
        image_folder: str | Path | None,
        processor,
        image_tokens: int,
        image_token_id: int,
        max_length: int = 2048,
        for_generation: bool = False,
        limit: int | None = None,
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
        self.records = records[:limit] if limit else records
        self.image_folder = Path(image_folder) if image_folder is not None else data_path.parent
        self.processor = processor
        self.image_tokens = image_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.for_generation = for_generation

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        messages = to_messages(record["conversations"])
        has_image = "image" in record and record["image"] is not None
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if has_image and placeholders == 0:
            messages[0] = {**messages[0], "content": f"{IMAGE_PLACEHOLDER}\n{messages[0]['content']}"}
            placeholders = 1
        if placeholders != (1 if has_image else 0):
            raise ValueError(
                f"sample {record.get('id', index)} has {placeholders} <image> placeholders but "
                f"{'one image' if has_image else 'no image'}"
            )
        input_ids, labels = encode_conversation(
            self.processor.tokenizer, messages, self.image_token_id, self.image_tokens, self.for_generation
        )
        if len(input_ids) > self.max_length:
            if has_image and input_ids[: self.max_length].count(self.image_token_id) != self.image_tokens:
                raise ValueError(
                    f"sample {record.get('id', index)} is {len(input_ids)} tokens; max_length {self.max_length} "
                    "would cut its image: raise max_length"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        item = {"input_ids": input_ids, "labels": labels, "pixel_values": None}
        if has_image:
            path = self.image_folder / record["image"]
            try:
                image = Image.open(path).convert("RGB")
            except (OSError, FileNotFoundError) as err:
                raise ValueError(f"sample {record.get('id', index)}: cannot read image {path}: {err}") from err
            item["pixel_values"] = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return item


@dataclass
class LlavaCollator:
    """Pads a list of dataset items into a model batch."""

    pad_token_id: int
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_labels:
            batch["labels"] = labels
        images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
