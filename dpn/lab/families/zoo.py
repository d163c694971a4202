"""The tiny reference LLaVA: model, tokenizer and processor, built locally and saved like a hub model.

- Vision: a CLIP ViT with 3 layers of width 128 on 96-pixel images in 8-pixel patches, so each
  image is a 12 x 12 grid of 144 visual tokens.
- Language: a Llama decoder with 6 layers of width 192.
- Tokenizer: byte-level BPE trained here with ``tokenizers`` (so any text encodes without unknown
  tokens), wrapped as ``PreTrainedTokenizerFast`` with a LLaVA-1.5 style chat template
  (``USER: <image>\\n... ASSISTANT: answer</s>``).
- Processor: ``LlavaProcessor`` with a PIL-backed CLIP image processor (no torchvision), which
  resizes any image to 96 x 96 and converts it to RGB.

Real models go through the same code: nothing downstream knows this model is tiny.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpn.lab.data.processor import ImageTextProcessor
from dpn.lab.data.synthetic import answer_vocabulary, question_corpus

IMAGE_SIZE = 96
PATCH_SIZE = 8
VOCAB_SIZE = 640
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IMAGE_TOKEN = "<image>"


def content_macro(image_text: str) -> str:
    """A Jinja macro ``render(content)``: a message's content as text. Content is a string (with
    ``<image>`` placeholders), or a list of parts as chat-format messages give it: an image part
    becomes ``image_text``, a text part its text."""
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content -%}"
        "{%- if part['type'] == 'image' -%}{{ " + repr(image_text) + " }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


CHAT_TEMPLATE = content_macro(IMAGE_TOKEN + "\n") + (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ render(message['content']) }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ render(message['content']) }} "
    "{% else %}ASSISTANT: {{ render(message['content']) }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Generic text so that the tokenizer has merges for ordinary English, not only the benchmark's words.
GENERIC_TEXT = (
    "The quick brown fox jumps over the lazy dog. What is in the picture? Describe the image in detail. "
    "How many objects are there? Which one is larger, smaller, left, right, above or below? "
    "Answer the question using a single word or phrase. Yes. No. The answer is"
)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128,
    )


def text_config(vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )


def llava_config(vocab_size: int = VOCAB_SIZE, image_token_id: int = 4, pad_token_id: int = 0,
                 bos_token_id: int = 1, eos_token_id: int = 2) -> LlavaConfig:
    """The tiny model's config (the token ids default to those of ``build_tokenizer``)."""
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(vocab_size, pad_token_id, bos_token_id, eos_token_id),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_tokenizer(vocab_size: int = VOCAB_SIZE, extra_special_tokens: tuple[str, ...] = (),
                    chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the benchmark's questions and answers plus generic English.
    ``extra_special_tokens`` (another family's markers) get ids after the LLaVA ones."""
    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"],
                SPECIAL_TOKENS["unk_token"], IMAGE_TOKEN, *extra_special_tokens]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = question_corpus() + [" ".join(answer_vocabulary())] * 20 + [GENERIC_TEXT] * 5
    corpus += [f"USER: {IMAGE_TOKEN}\n{q} ASSISTANT: {a}" for q in question_corpus()[:50] for a in answer_vocabulary()]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *extra_special_tokens]})
    wrapped.chat_template = chat_template
    return wrapped


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False, do_resize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_tiny(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA and its processor."""
    tokenizer = build_tokenizer()
    config = llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, build_processor(tokenizer)


def save_tiny(model: PreTrainedModel, processor, directory: str | Path) -> Path:
    """Save a model and its processor (a ``LlavaProcessor`` or an ``ImageTextProcessor``) like a hub checkpoint."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load(directory: str | Path) -> tuple[PreTrainedModel, ImageTextProcessor]:
    """Load a checkpoint of any family dpn runs (tiny or not) and its processor's parts from a
    local directory."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no model (config.json missing)")
    model = AutoModelForImageTextToText.from_pretrained(directory)
    return model, ImageTextProcessor.from_pretrained(directory)
