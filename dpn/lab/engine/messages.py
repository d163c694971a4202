"""Chat messages in the one form the engine answers: ``{"role", "content"}`` with text content in
which each image is an ``<image>`` placeholder line, plus the images in order.

Requests arrive in other forms: the OpenAI chat format (content a string or a list of
``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}`` parts; ``dpn
serve``), lmms-eval's (``{"type": "image", "url": <PIL image>}`` parts; the lmms plugin), or a
question with its images (lmms-eval's single-turn requests). Each caller says how an image part
becomes an image (a server decodes data URLs, lmms-eval hands images over); the rest is here.
"""

from __future__ import annotations

from typing import Any, Callable

from PIL import Image

from dpn.lab.data.llava import IMAGE_LINE, with_image_placeholders

ROLES = ("system", "user", "assistant")
# Part types that carry an image: OpenAI's (dpn serve) and lmms-eval's.
OPENAI_IMAGE_PART = "image_url"
LMMS_IMAGE_PART = "image"


class MessageError(ValueError):
    """A message the engine cannot take; ``where`` names it (``messages[2]``), for a server's reply."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


# An image part's loader: the part and where it is (for errors) -> the image.
ImageLoader = Callable[[dict, str], Image.Image]


def flatten_content(content: Any, load_image: ImageLoader, image_part: str, where: str) -> tuple[str, list[Image.Image]]:
    """A message's content as text with image placeholders, and its images (parts of type
    ``image_part``, each loaded by ``load_image``)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise MessageError(f"{where}.content must be a string or a list of parts", where)
    text, images = "", []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind == image_part:
            images.append(load_image(part, where))
            text += IMAGE_LINE
        else:
            raise MessageError(f"{where}: parts must be {{type: text, text}} or {{type: {image_part}, ...}}, got a part "
                               f"of type {kind!r}", where)
    return text, images


def normalise_messages(raw: Any, load_image: ImageLoader, image_part: str) -> tuple[list[dict], list[Image.Image]]:
    """Chat messages in the engine's form and their images (parts of type ``image_part``); the last
    message must be the user's."""
    if not isinstance(raw, list) or not raw:
        raise MessageError("'messages' must be a non-empty list", "messages")
    messages, images = [], []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise MessageError(f"{where} must be an object with a role in {ROLES}", where)
        text, found = flatten_content(message.get("content"), load_image, image_part, where)
        messages.append({"role": message["role"], "content": text})
        images += found
    if messages[-1]["role"] != "user":
        raise MessageError("the last message must be the user's", "messages")
    return messages, images


def question_about(text: str, images: list[Image.Image]) -> list[dict]:
    """One user message asking ``text`` about ``images`` (placed first, as the data path places them)."""
    return with_image_placeholders([{"role": "user", "content": text}], len(images))
