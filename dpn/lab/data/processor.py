"""A checkpoint's tokenizer and image processor, loaded and saved without its full processor class.

The lab needs two parts of a model's processor: the tokenizer (with the chat template) and the
image processor. Loading the family's whole processor class would need more: Qwen2.5-VL's and
LLaVA-OneVision's processors build a video processor, which needs torchvision (absent on a CPU
machine). So the parts are loaded on their own, and the processor's other files are carried over
verbatim when the lab saves a checkpoint, so that ``AutoProcessor`` still loads what it writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer

# Files of a processor beyond its tokenizer's and image processor's own, written back unchanged.
CARRIED_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja", "video_preprocessor_config.json")
LEGACY_CHAT_TEMPLATE = "chat_template.json"  # {"chat_template": "..."}, as older processors saved it


@dataclass
class ImageTextProcessor:
    """``tokenizer`` and ``image_processor`` of one checkpoint; ``files`` are carried over on save."""

    tokenizer: Any
    image_processor: Any
    files: dict[str, str] = field(default_factory=dict)
    model_input_names: list[str] = field(default_factory=lambda: ["input_ids"])

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageTextProcessor:
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = AutoImageProcessor.from_pretrained(directory)
        files = {name: (directory / name).read_text() for name in CARRIED_FILES if (directory / name).is_file()}
        if tokenizer.chat_template is None and LEGACY_CHAT_TEMPLATE in files:
            tokenizer.chat_template = json.loads(files[LEGACY_CHAT_TEMPLATE])["chat_template"]
        if tokenizer.chat_template is None:
            raise ValueError(f"{directory} has no chat template (neither the tokenizer's nor the processor's); "
                             "dpn renders conversations with it")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {directory} has no pad token; set one (e.g. the end-of-text token) "
                             "so that batches can be padded")
        return cls(tokenizer, image_processor, files)

    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (directory / name).write_text(text)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
