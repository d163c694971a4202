"""dpn's vLLM plugin (dpn.lab.vllm_plugin, dpn.lab.vllm_llava).

The pooling and its refusals are checked without vLLM, against dpn's own runtime. The end-to-end
test serves a saved projector pyramid in vLLM and needs vLLM installed (docs/serving.md says how on a
CPU machine); it is skipped without it."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import dpn
from dpn.lab.vllm_plugin import KEPT, DiverseSelection, ProjectorPooling, register, saved_llava_compression
from helpers import GRID, batch_of, first_layer_input, make_prompt, pixels, tiny_llava

TEXT_BEFORE, TEXT_AFTER = 3, 4
LLAVA, QWEN = "DpnLlavaForConditionalGeneration", "DpnQwen2_5_VLForConditionalGeneration"


def _one_image_and_its_projected_features():
    """A tiny LLaVA without a pyramid, a one-image batch, and the image's (1, grid tokens, d) projected
    features: what the plugin's model hands its compression."""
    model = tiny_llava()
    batch = {**batch_of([make_prompt(TEXT_BEFORE, TEXT_AFTER)]), "pixel_values": pixels(1)}
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    return model, batch, torch.cat(list(features)).reshape(1, GRID[0] * GRID[1], -1)


@pytest.mark.parametrize("stride", [(2, 2), (4, 4), (1, 2), (4, 1)])
def test_the_plugin_pools_the_features_as_dpns_runtime_feeds_them_to_the_llm(stride):
    model, batch, features = _one_image_and_its_projected_features()
    dpn.apply_pyramid(model, dpn.presets.projector(model, stride))
    pooling = ProjectorPooling.from_config(dpn.get_pyramid_config(model))
    received, _ = first_layer_input(model, batch)
    tokens = pooling.tokens(GRID)
    assert tokens == (GRID[0] // stride[0]) * (GRID[1] // stride[1])
    assert received.shape[1] == batch["input_ids"].shape[1] - GRID[0] * GRID[1] + tokens  # the prompt's placeholders
    visual = received[:, TEXT_BEFORE:TEXT_BEFORE + tokens]
    torch.testing.assert_close(pooling.pool(features, GRID), visual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_the_plugin_selects_divprunes_tokens_as_dpns_runtime_feeds_them_to_the_llm(keep_ratio, tmp_path):
    model, batch, features = _one_image_and_its_projected_features()
    dpn.apply_pyramid(model, dpn.presets.from_spec(f"divprune:{keep_ratio}", model))
    dpn.save_pyramid(model, tmp_path)
    selection = saved_llava_compression(tmp_path)
    assert selection == DiverseSelection(keep_ratio)
    received, _ = first_layer_input(model, batch)
    tokens = selection.tokens(GRID)
    assert received.shape[1] == batch["input_ids"].shape[1] - GRID[0] * GRID[1] + tokens
    torch.testing.assert_close(selection.compress(features, GRID), received[:, TEXT_BEFORE:TEXT_BEFORE + tokens],
                               rtol=1e-5, atol=1e-6)


def test_a_grid_below_min_tokens_to_pool_is_served_whole():
    model = tiny_llava()
    config = dpn.presets.projector(model, (2, 2), min_tokens_to_pool=GRID[0] * GRID[1] + 1)
    pooling = ProjectorPooling.from_config(config)
    features = torch.randn(2, GRID[0] * GRID[1], 8)
    assert pooling.tokens(GRID) == GRID[0] * GRID[1] and torch.equal(pooling.pool(features, GRID), features)
    with pytest.raises(ValueError, match="do not form the 8x8 grid"):
        pooling.pool(features[:, :-1], GRID)


def test_pyramids_vllm_cannot_serve_are_refused_with_the_reason(tmp_path):
    model = tiny_llava()
    with pytest.raises(ValueError, match="act before the LLM .* this one is 'fastv'"):
        ProjectorPooling.from_config(dpn.presets.fastv(model))
    with pytest.raises(ValueError, match="save it with positions='renumber'"):
        ProjectorPooling.from_config(dpn.presets.projector(model, (2, 2), positions="keep"))
    with pytest.raises(ValueError, match="save it with positions='keep'"):  # Qwen2.5-VL's M-RoPE keeps them
        ProjectorPooling.from_config(dpn.presets.projector(model, (2, 2)), positions=KEPT)
    with pytest.raises(FileNotFoundError, match="has no pyramid_config.json"):
        ProjectorPooling.from_model_dir(tmp_path)
    with pytest.raises(ValueError, match="this one is 'fastv'"):
        dpn.apply_pyramid(model, dpn.presets.fastv(model))
        dpn.save_pyramid(model, tmp_path)
        saved_llava_compression(tmp_path)
    dpn.remove_pyramid(model)
    dpn.apply_pyramid(model, dpn.presets.from_spec("divprune:0.5", model, positions="keep"))
    dpn.save_pyramid(model, tmp_path / "kept")
    with pytest.raises(ValueError, match="save it with positions='renumber'"):
        saved_llava_compression(tmp_path / "kept")
    dpn.remove_pyramid(model)
    dpn.apply_pyramid(model, dpn.presets.projector(model, (2, 2)))
    dpn.save_pyramid(model, tmp_path)
    strategy = dpn.get_pyramid_config(model).strategy
    assert ProjectorPooling.from_model_dir(tmp_path) == ProjectorPooling((2, 2), strategy.pooling,
                                                                         strategy.min_tokens_to_pool)


def test_window_origins_are_the_first_token_of_each_window_partial_ones_included():
    pooling = ProjectorPooling((2, 3), "max", 0)
    rows, cols = pooling.window_origins((3, 4))  # windows at rows 0, 2 and columns 0, 3
    assert list(zip(rows, cols)) == [(0, 0), (0, 3), (2, 0), (2, 3)]
    assert pooling.tokens((3, 4)) == 4
    assert ProjectorPooling((2, 2), "max", 100).window_origins((2, 3)) == ([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])


def test_the_plugin_is_declared_to_vllm():
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("dpn") == "dpn.lab.vllm_plugin:register"


# ------------------------------------------------------------------------- served by vLLM (if installed)
QUESTIONS = ("What color is the square?", "How many circles are there?", "What shape is on the left?",
             "Is there a red triangle?")
NEW_TOKENS = 6
TOP_LOGPROBS = 5
# Qwen2.5-VL images of several sizes: merged grids 4x5, 5x4, 7x7 and 4x4, pooled 2x2 with partial windows.
QWEN_IMAGE_SIZES = ((56, 70), (70, 56), (98, 98), (56, 56))


def _engine(directory, architecture: str, max_model_len: int):
    from vllm import LLM

    register()
    return LLM(model=str(directory), hf_overrides={"architectures": [architecture]}, dtype="float32",
               enforce_eager=True, max_model_len=max_model_len, max_num_seqs=len(QUESTIONS),
               limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1, disable_log_stats=True)


def _images(sizes, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in sizes]


def _served_llava(tmp_path_factory, spec: str):
    """The shipped tiny LLaVA with ``spec``, saved, its images and prompts, and vLLM serving it."""
    pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: installing vLLM beside dpn)")
    from dpn.lab.demo import BASE_CHECKPOINT
    from dpn.lab.families import zoo

    directory = tmp_path_factory.mktemp("llava")
    model, processor = zoo.load(BASE_CHECKPOINT)  # trained: its greedy answers are not near-ties
    dpn.apply_pyramid(model, dpn.presets.from_spec(spec, model))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    dpn.save_pyramid(model, directory)
    side = model.config.vision_config.image_size
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS]
    return model.eval(), directory, _images([(side, side)] * len(QUESTIONS)), prompts, _engine(directory, LLAVA, 512)


@pytest.fixture(scope="module")
def served_llava(tmp_path_factory):
    return _served_llava(tmp_path_factory, "projector:2x2")


@pytest.fixture(scope="module")
def served_llava_divprune(tmp_path_factory):
    return _served_llava(tmp_path_factory, "divprune:0.25")


@pytest.fixture(scope="module")
def served_qwen(tmp_path_factory):
    """A random tiny Qwen2.5-VL with projector:2x2 (positions kept), saved, images of several sizes,
    chat prompts, and vLLM serving it."""
    pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: installing vLLM beside dpn)")
    from transformers import AutoProcessor

    from dpn.lab.families.base import build_tiny

    directory = tmp_path_factory.mktemp("qwen")
    model, processor = build_tiny("qwen2.5-vl", seed=0)
    dpn.apply_pyramid(model, dpn.presets.projector(model, (2, 2), positions=KEPT))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    dpn.save_pyramid(model, directory)
    chat = AutoProcessor.from_pretrained(directory)
    prompts = [chat.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                        add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    return model.eval(), directory, _images(QWEN_IMAGE_SIZES), prompts, _engine(directory, QWEN, 1024)


def _served(engine, prompts, images):
    """vLLM's greedy answers, prompt lengths and, per answer token, its top log-probabilities {id: value}."""
    from vllm import SamplingParams

    results = engine.generate([{"prompt": p, "multi_modal_data": {"image": i}} for p, i in zip(prompts, images)],
                              SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP_LOGPROBS),
                              use_tqdm=False)
    return ([list(r.outputs[0].token_ids) for r in results], [len(r.prompt_token_ids) for r in results],
            [[{k: v.logprob for k, v in step.items()} for step in r.outputs[0].logprobs] for r in results])


def _dpn_generate(model, directory, prompts, images):
    """dpn's greedy answers, prompt lengths (unpooled) and per-step log-probabilities (the whole vocabulary)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    answers, lengths, logprobs = [], [], []
    for prompt, image in zip(prompts, images):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        answers.append(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        lengths.append(inputs["input_ids"].shape[1])
        logprobs.append([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return answers, lengths, logprobs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_divprune", "qwen"])
def test_vllm_serves_the_pooled_prompt_as_dpn_answers_it(family, request):
    model, directory, images, prompts, engine = request.getfixturevalue(f"served_{family}")
    expected, lengths, expected_logprobs = _dpn_generate(model, directory, prompts, images)
    answers, served_lengths, logprobs = _served(engine, prompts, images)
    pooling = ProjectorPooling.from_model_dir(directory, KEPT) if family == "qwen" else saved_llava_compression(directory)
    merge = getattr(model.config.vision_config, "spatial_merge_size", None)
    if merge:  # Qwen2.5-VL: each image's merged grid, from the processor's patch grid
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        grids = [tuple(v // merge for v in processor(text=p, images=i)["image_grid_thw"][0][1:])
                 for p, i in zip(prompts, images)]
    else:
        grids = [dpn.models.geometry_of(model.config).image_grids[0]] * len(prompts)
    assert served_lengths == [n - g[0] * g[1] + pooling.tokens(g) for n, g in zip(lengths, grids)]  # shorter
    assert answers == expected
    for served_steps, dpn_steps in zip(logprobs, expected_logprobs):  # the same distributions, step by step
        for served_top, dpn_all in zip(served_steps, dpn_steps):
            ids = sorted(served_top, key=served_top.get, reverse=True)[:TOP_LOGPROBS]
            assert ids == dpn_all.topk(TOP_LOGPROBS).indices.tolist()
            torch.testing.assert_close(torch.tensor([served_top[i] for i in ids]), dpn_all[ids], atol=1e-4, rtol=0)
    alone = [_served(engine, [p], [i])[0][0] for p, i in zip(prompts, images)]
    assert alone == answers  # concurrent requests answer as each alone


def test_qwen_positions_in_vllm_are_the_ones_dpn_gives_the_pooled_prompt(served_qwen):
    """Exact: the M-RoPE coordinates the vLLM model computes for each pooled prompt equal the
    position_ids dpn's forward reports in its final (pooled) layout, and decoding continues from the
    same next position (the random tiny model's answers are too insensitive to show a slip)."""
    from types import SimpleNamespace

    from transformers import AutoProcessor

    from dpn.lab.vllm_qwen2_5_vl import DpnQwen2_5_VLForConditionalGeneration as Served

    model, directory, images, prompts, _ = served_qwen
    processor = AutoProcessor.from_pretrained(directory)
    served = SimpleNamespace(config=model.config, dpn_pooling=ProjectorPooling.from_model_dir(directory, KEPT))
    served.iter_mm_grid_thw = lambda features: Served.iter_mm_grid_thw(served, features)
    for prompt, image in zip(prompts, images):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        expected = out.position_ids[:, 0]  # (3, pooled length)
        image_token = model.config.image_token_id
        offset = int((inputs["input_ids"][0] == image_token).nonzero()[0])
        feature = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=offset),
                                  data={"image_grid_thw": SimpleNamespace(data=inputs["image_grid_thw"][0])})
        positions, delta = Served.get_mrope_input_positions(served, [0] * expected.shape[1], [feature])
        assert torch.equal(positions, expected)
        with torch.no_grad(), dpn.pyramid_disabled(model):
            stock = model(**inputs).rope_deltas  # the stock model's: next position = its length + delta
        assert expected.shape[1] + delta == inputs["input_ids"].shape[1] + int(stock)
