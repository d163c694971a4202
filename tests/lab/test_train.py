"""PyramidTrainer: routing loss under gradient accumulation, checkpoints with routers, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

import dpn
from dpn.lab.data.llava import LlavaCollator, LlavaDataset
from dpn.lab.data.synthetic import generate_split
from dpn.lab.train import PyramidTrainer, TrainOptions, train
from dpn.lab import zoo


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate_split(root, "train", 16, seed=0)
    return root / "train.json"


def _options(data, out, **kwargs):
    defaults = dict(data=str(data), output_dir=str(out), pyramid="paper", max_steps=4, batch_size=4,
                    save_steps=2, logging_steps=1, warmup_steps=1, progress=False)
    return TrainOptions(**{**defaults, **kwargs})


def test_training_writes_routers_and_logs_routing(data, tmp_path):
    out = train(_options(data, tmp_path / "run", router_learning_rate=1e-2))
    for directory in (out, out / "checkpoint-4"):
        assert (directory / "pyramid_model.safetensors").is_file() and (directory / "pyramid_config.json").is_file()
    assert not any(k.startswith("pyramid.") for k in load_file(out / "model.safetensors"))
    logs = json.loads((out / "log_history.json").read_text())
    step_logs = [entry for entry in logs if "loss" in entry]
    assert {"routing_loss", "kept_visual_tokens", "flops_ratio", "stage0_expert2"} <= set(step_logs[0])
    model, _ = zoo.load(out)
    dpn.load_pyramid(model, out)  # the routers moved away from their initialisation
    fresh, _ = zoo.load(out)
    dpn.apply_pyramid(fresh, dpn.get_pyramid_config(model))
    assert not torch.equal(model.pyramid.routers[0].up.weight, fresh.pyramid.routers[0].up.weight)


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill after step 3 (last checkpoint: step 2)")


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(data, tmp_path):
    straight = train(_options(data, tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train(_options(data, tmp_path / "killed"), callbacks=[_Crash()])
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = train(_options(data, tmp_path / "killed"))
    for name in ("model.safetensors", "pyramid_model.safetensors"):
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    steps = [e["step"] for e in json.loads((resumed / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3, 4]


def test_routing_loss_is_not_overweighted_by_gradient_accumulation(data, tmp_path):
    model, processor = zoo.build_tiny(seed=0)
    config = dpn.PyramidConfig.paper_default(model.config, sample_in_training=False, routing_loss_weight=0.5)
    dpn.apply_pyramid(model, config)
    dataset = LlavaDataset(data, None, processor, image_tokens=144, image_token_id=model.config.image_token_id)
    collate = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)
    items = [dataset[i] for i in range(4)]
    full, halves = collate(items), [collate(items[:2]), collate(items[2:])]
    items_in_batch = int((full["labels"][:, 1:] != -100).sum())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_grad_norm=None)
    trainer = PyramidTrainer(model=model, args=args, router_learning_rate=1e-3)

    def router_grads(batches):
        model.zero_grad()
        trainer.current_gradient_accumulation_steps = len(batches)
        for batch in batches:
            trainer.training_step(model, batch, num_items_in_batch=torch.tensor(items_in_batch))
        return torch.cat([p.grad.flatten() for p in model.pyramid.parameters()])

    accumulated, single = router_grads(halves), router_grads([full])
    assert single.abs().sum() > 0
    torch.testing.assert_close(accumulated, single, rtol=1e-4, atol=1e-6)


def test_router_learning_rate_gets_its_own_group(data, tmp_path):
    model, _ = zoo.build_tiny(seed=0)
    dpn.apply_pyramid(model, dpn.PyramidConfig.paper_default(model.config))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-4)
    optimizer = PyramidTrainer(model=model, args=args, router_learning_rate=3e-3).create_optimizer()
    router_ids = {id(p) for p in model.pyramid.parameters()}
    router_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & router_ids]
    assert len(router_groups) == 1 and router_groups[0]["lr"] == 3e-3
    assert {id(p) for p in router_groups[0]["params"]} == router_ids
