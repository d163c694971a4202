"""`dpn train` and `dpn eval` on locally saved tiny Qwen2.5-VL and LLaVA-OneVision checkpoints (their
own image processors and chat templates): images of different sizes, a two-image and a text-only
sample in one batch."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import dpn
from dpn.lab.families import zoo
from dpn.lab.cli import main
from dpn.lab.families import family_images, tiny_builders
from dpn.lab.data.llava import LlavaCollator, LlavaDataset
from dpn.lab.data.synthetic import generate_split
from dpn.lab.engine.answering import Answerer, Prepared


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Benchmark samples (96 x 96 images) plus a wide image, a sample with two images and a text-only one."""
    root = tmp_path_factory.mktemp("families")
    generate_split(root, "train", 8, seed=0)
    records = generate_split(root, "test", 5, seed=1)
    Image.new("RGB", (128, 64), (200, 10, 10)).save(root / "wide.png")
    records += [
        {"id": "wide", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]},
        {"id": "two", "image": ["wide.png", records[0]["image"]], "conversations": [
            {"from": "human", "value": "<image> and <image>: the same?"}, {"from": "gpt", "value": "no"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say yes"}, {"from": "gpt", "value": "yes"}]},
    ]
    (root / "mixed.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module", params=[name for name in tiny_builders() if name != "llava"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "model"
    assert main(["tiny", "--family", request.param, "--output", str(directory)]) == 0
    return directory


def _mixed_batch(checkpoint, data):
    model, processor = zoo.load(checkpoint)
    images = family_images(model.config, processor)
    dataset = LlavaDataset(data / "mixed.json", None, images, for_generation=True)
    items = [dataset[i] for i in range(len(dataset) - 5, len(dataset))]  # two benchmark samples, then the three
    return model.eval(), processor, items, LlavaCollator(processor.tokenizer.pad_token_id, images, "left", False)(items)


def test_each_image_gets_as_many_placeholders_as_the_stock_model_has_features(checkpoint, data):
    model, _, items, batch = _mixed_batch(checkpoint, data)
    tokens = [item["images"].tokens if item["images"] else [] for item in items]
    assert tokens[2] != tokens[0]  # the wide image has its own grid
    assert len(tokens[3]) == 2 and tokens[4] == []
    pixels = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        features = model.model.get_image_features(**pixels, return_dict=True).pooler_output
    assert [f.shape[0] for f in features] == [n for sample in tokens for n in sample]
    with torch.no_grad():
        model(**batch)  # the stock forward checks placeholders against features itself


def test_the_answerer_matches_generate_with_and_without_a_pyramid(checkpoint, data):
    model, processor, items, batch = _mixed_batch(checkpoint, data)
    tokenizer = processor.tokenizer
    for pyramid in (None, "paper"):
        if pyramid is not None:
            dpn.apply_pyramid(model, dpn.presets.from_spec(pyramid, model.config))
        answers = Answerer(model, processor).answer([Prepared.encoded(item, 4) for item in items])
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:].tolist()
        assert [a.token_ids for a in answers] == [row[:len(a.token_ids)] for a, row in zip(answers, new)]
    assert answers[4].visual_tokens is None and answers[4].experts is not None  # the text-only sample
    assert all(a.visual_tokens[0] > a.visual_tokens[-1] for a in answers[:4])


def test_train_and_eval_through_the_cli(checkpoint, data, tmp_path):
    out = tmp_path / "trained"
    assert main(["train", "--init-from", str(checkpoint), "--data", str(data / "train.json"), "--pyramid", "paper",
                 "--steps", "2", "--batch-size", "4", "--save-steps", "2", "--logging-steps", "1",
                 "--freeze-vision", "--output", str(out), "--no-progress"]) == 0
    losses = [e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    model, _ = zoo.load(out)
    original, _ = zoo.load(checkpoint)
    assert type(model) is type(original)
    frozen, before = (m.get_encoder(modality="image").state_dict() for m in (model, original))
    assert all(torch.equal(frozen[k], before[k]) for k in before)  # --freeze-vision held the vision tower
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert (out / "pyramid_config.json").is_file() and (out / "preprocessor_config.json").is_file()

    predictions = {}
    for batch_size in (4, 1):
        results = tmp_path / f"eval-{batch_size}"
        assert main(["eval", "--model", str(out), "--data", str(data / "mixed.json"), "--output", str(results),
                     "--batch-size", str(batch_size), "--max-new-tokens", "3", "--no-latency"]) == 0
        lines = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
        predictions[batch_size] = {r["id"]: (r["prediction"], r["visual_tokens"]) for r in lines}
        summary = json.loads((results / "summary.json").read_text())
        assert summary["overall"]["n"] == 8 and 0 < summary["overall"]["flops_ratio"] < 1
    assert predictions[4] == predictions[1]  # batching changes nothing, routing per sample included
    assert predictions[4]["text"][1][0] == 0 and predictions[4]["two"][1][0] > 0


def test_fitted_routers_train_fit_and_evaluate_on_every_family(checkpoint, data, tmp_path):
    """The fitted DPN on grids of every size: uniform paths in training, then every path of the
    training samples swept to fit the routers; the fitted routers then route the mixed test batch."""
    out = tmp_path / "fitted"
    assert main(["train", "--init-from", str(checkpoint), "--data", str(data / "train.json"), "--pyramid", "fitted:0.3",
                 "--steps", "2", "--batch-size", "4", "--save-steps", "2", "--router_fit_samples", "4",
                 "--output", str(out), "--no-progress"]) == 0
    record = json.loads((out / "router_fit.json").read_text())
    assert record["samples"] == 4 and all(abs(sum(shares) - 1) < 1e-6 for shares in record["target_shares"] if shares)
    results = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--data", str(data / "mixed.json"), "--output", str(results),
                 "--max-new-tokens", "2", "--no-latency"]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert summary["pyramid"]["positions"] == "keep" and summary["overall"]["n"] == 8
