"""One message normaliser for the server and the lmms-eval plugin."""

from __future__ import annotations

import pytest
from PIL import Image

from dpn.lab.engine.messages import MessageError, flatten_content, normalise_messages, question_about

RED = Image.new("RGB", (4, 4), "red")
BLUE = Image.new("RGB", (4, 4), "blue")


def by_colour(part, where):
    return {"red": RED, "blue": BLUE}[part["colour"]]


def test_parts_become_text_with_one_placeholder_line_per_image_in_order():
    text, images = flatten_content([{"type": "text", "text": "Compare "}, {"type": "image", "colour": "blue"},
                                    {"type": "text", "text": "and "}, {"type": "image", "colour": "red"},
                                    {"type": "text", "text": "?"}], by_colour, "image", "messages[0]")
    assert text == "Compare <image>\nand <image>\n?"
    assert images == [BLUE, RED]


def test_messages_keep_roles_and_gather_images_across_turns():
    messages, images = normalise_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "colour": "red"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image", "colour": "blue"}, {"type": "text", "text": "And now?"}]},
    ], by_colour, "image")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3]["content"] == "<image>\nAnd now?" and images == [RED, BLUE]


@pytest.mark.parametrize("raw, where, message", [
    ([], "messages", "non-empty list"),
    ("hello", "messages", "non-empty list"),
    ([{"role": "robot", "content": "hi"}], "messages[0]", "role in"),
    ([{"role": "user", "content": 3}], "messages[0]", "string or a list of parts"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "audio"}]}], "messages[1]",
     "parts must be .*type: image_url.*got a part of type 'audio'"),
    ([{"role": "assistant", "content": "hi"}], "messages", "last message must be the user's"),
])
def test_bad_messages_say_which_and_what(raw, where, message):
    with pytest.raises(MessageError, match=message) as raised:
        normalise_messages(raw, by_colour, "image_url")
    assert raised.value.where == where


def test_a_question_about_images_puts_them_first():
    assert question_about("What digit?", [RED, BLUE]) == [{"role": "user", "content": "<image>\n<image>\nWhat digit?"}]
    assert question_about("Hi", []) == [{"role": "user", "content": "Hi"}]
