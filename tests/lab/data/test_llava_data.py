"""LLaVA-format loading: answer-only labels, image token runs, mixed text-only batches."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dpn.lab.families import zoo
from dpn.lab.families import family_images
from dpn.lab.data.llava import LlavaCollator, LlavaDataset, encode_conversation, to_messages
from dpn.supervision import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor():
    return zoo.build_processor(zoo.build_tokenizer())


def _images(processor):
    tokenizer = processor.tokenizer
    config = zoo.llava_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(zoo.IMAGE_TOKEN))
    return family_images(config, processor)


def _dataset(tmp_path, processor, records, **kwargs):
    (tmp_path / "data.json").write_text(json.dumps(records))
    return LlavaDataset(tmp_path / "data.json", tmp_path, _images(processor), **kwargs)


def test_labels_cover_only_the_answers(processor):
    tokenizer = processor.tokenizer
    messages = to_messages([
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"},
    ])
    image_id = tokenizer.convert_tokens_to_ids(zoo.IMAGE_TOKEN)
    ids, labels = encode_conversation(tokenizer, messages, image_id, image_tokens=[144])
    assert ids.count(image_id) == 144 and len(ids) == len(labels)
    targets = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert targets == " red</s> circle</s>"
    prompt_ids, prompt_labels = encode_conversation(tokenizer, messages, image_id, [144], for_generation=True)
    assert tokenizer.decode(prompt_ids).endswith("And the shape? ASSISTANT:")
    assert set(prompt_labels) == {IGNORE_INDEX}


def test_text_only_and_image_samples_mix_in_a_batch(tmp_path, processor):
    Image.new("RGB", (50, 80), (255, 0, 0)).save(tmp_path / "red.png")
    records = [
        {"id": "a", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                          {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
        {"id": "c", "image": "red.png", "conversations": [{"from": "human", "value": "Color?"},
                                                          {"from": "gpt", "value": "red"}]},
    ]
    dataset = _dataset(tmp_path, processor, records)
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id, images=dataset.images)(
        [dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    image_id = processor.tokenizer.convert_tokens_to_ids(zoo.IMAGE_TOKEN)
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [144, 0, 144]  # placeholder added for "c"
    left = LlavaCollator(pad_token_id=0, images=dataset.images, padding_side="left", with_labels=False)(
        [dataset[1], dataset[0]])
    assert "labels" not in left and left["attention_mask"][0, 0] == 0 and left["attention_mask"][:, -1].all()


def test_bad_samples_are_clear_errors(tmp_path, processor):
    two_images = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> <image> hi"}, {"from": "gpt", "value": "no"}]}]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        _dataset(tmp_path, processor, two_images)[0]
    missing = [{"id": "y", "image": "missing.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]}]
    with pytest.raises(ValueError, match="cannot read image"):
        _dataset(tmp_path, processor, missing)[0]
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    long = [{"id": "z", "image": "small.png", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "no"}]}]
    with pytest.raises(ValueError, match="would cut its image"):
        _dataset(tmp_path, processor, long, max_length=50)[0]
    with pytest.raises(ValueError, match="unknown speaker"):
        to_messages([{"from": "robot", "value": "x"}])
