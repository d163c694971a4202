"""The tiny reference model: tokenizer, processor, save/load like a hub model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dpn.lab.families import zoo
from dpn.lab.demo import BASE_CHECKPOINT


@pytest.fixture(scope="module")
def tiny():
    return zoo.build_tiny(seed=0)


@pytest.mark.parametrize("text", ["héllo wörld 日本 🙂", "USER: <image>\nWhat color? ASSISTANT: red", "\t\n  ~`|"])
def test_tokenizer_encodes_any_text_losslessly(tiny, text):
    tokenizer = tiny[1].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_image_placeholder_is_one_special_token(tiny):
    model, processor = tiny
    ids = processor.tokenizer("a <image> b", add_special_tokens=False)["input_ids"]
    assert ids.count(model.config.image_token_id) == 1


def test_chat_template_is_llava_style(tiny):
    messages = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}]
    assert tiny[1].tokenizer.apply_chat_template(messages, tokenize=False) == "<s>USER: <image>\nWhat? ASSISTANT: red</s>"


@pytest.mark.parametrize("size, mode", [((200, 50), "L"), ((31, 77), "RGBA"), ((96, 96), "P")])
def test_processor_accepts_any_image(tiny, size, mode):
    model, processor = tiny
    out = processor(images=[Image.new(mode, size)], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 96, 96)
    assert int((out["input_ids"] == model.config.image_token_id).sum()) == 144


def test_save_and_load_like_a_hub_model(tiny, tmp_path):
    model, processor = tiny
    zoo.save_tiny(model, processor, tmp_path)
    loaded, loaded_processor = zoo.load(tmp_path)
    ids = processor.tokenizer("USER: hi", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    assert loaded_processor.tokenizer.chat_template == zoo.CHAT_TEMPLATE
    assert loaded.config.text_config.num_hidden_layers == 6 and loaded.config.vision_config.hidden_size == 128


def test_load_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        zoo.load(tmp_path)


def test_chat_format_messages_with_image_parts_render_like_placeholders(tiny):
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = [{"role": "user", "content": "<image>\nWhat?"}]
    render = tiny[1].tokenizer.apply_chat_template
    assert render(parts, tokenize=False, add_generation_prompt=True) == render(text, tokenize=False,
                                                                              add_generation_prompt=True)


def test_the_shipped_model_answers_chat_messages_in_a_pipeline():
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(BASE_CHECKPOINT))
    image = Image.new("RGB", (96, 96), (255, 0, 0))
    question = "What color is the large shape?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    chat = pipe(text=messages, max_new_tokens=4, do_sample=False)
    raw = pipe(images=image, text=f"USER: <image>\n{question} ASSISTANT:", max_new_tokens=4, do_sample=False,
               return_full_text=False)
    answer = chat[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"] == raw[0]["generated_text"]
