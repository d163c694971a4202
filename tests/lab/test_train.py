"""PyramidTrainer: routing loss under gradient accumulation, checkpoints with routers, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType

import dpn
from dpn.lab.cli import main
from dpn.lab.families import family_images
from dpn.lab.data.llava import LlavaCollator, LlavaDataset
from dpn.lab.data.synthetic import generate_split
from dpn.lab.train import PyramidTrainer, PyramidTrainingArguments, TrainOptions, parse_train_args, train
from dpn.lab.families import zoo


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate_split(root, "train", 16, seed=0)
    return root / "train.json"


def _options(data, out, **kwargs):
    """``train``'s two arguments: each keyword goes to the dataclass with that field."""
    defaults = dict(data=str(data), output_dir=str(out), pyramid="paper", max_steps=4, per_device_train_batch_size=4,
                    save_steps=2, logging_steps=1, warmup_steps=1, progress=False)
    values = {**defaults, **kwargs}
    own = {f.name for f in fields(TrainOptions)}
    return (TrainOptions(**{k: v for k, v in values.items() if k in own}),
            PyramidTrainingArguments(**{k: v for k, v in values.items() if k not in own}))


def test_training_writes_routers_and_logs_routing(data, tmp_path):
    out = train(*_options(data, tmp_path / "run", router_learning_rate=1e-2))
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


def test_fitted_routers_are_fitted_after_training_and_nothing_else_moves(data, tmp_path):
    out = train(*_options(data, tmp_path / "run", pyramid="fitted:0.3", router_fit_samples=6))
    record = json.loads((out / "router_fit.json").read_text())
    assert record["samples"] == 6 and len(record["target_shares"]) == 2
    trained, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(tensor, checkpoint[name]) for name, tensor in trained.items())  # fitting leaves the LLM
    routers = [load_file(path / "pyramid_model.safetensors") for path in (out / "checkpoint-2", out / "checkpoint-4", out)]
    assert all(torch.equal(routers[0][name], routers[1][name]) for name in routers[0])  # training left them alone
    assert any(not torch.equal(routers[1][name], routers[2][name]) for name in routers[1])  # the fit moved them


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill after step 3 (last checkpoint: step 2)")


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(data, tmp_path):
    straight = train(*_options(data, tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train(*_options(data, tmp_path / "killed"), callbacks=[_Crash()])
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = train(*_options(data, tmp_path / "killed"))
    _assert_resumed_as_straight(straight, resumed, ("model.safetensors", "pyramid_model.safetensors"))


def _assert_resumed_as_straight(straight, resumed, files) -> None:
    """A killed-and-resumed run wrote the same weights as the uninterrupted one, and logged every step once."""
    for name in files:
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    steps = [e["step"] for e in json.loads((resumed / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3, 4]


def test_routing_loss_is_not_overweighted_by_gradient_accumulation(data, tmp_path):
    model, processor = zoo.build_tiny(seed=0)
    config = dpn.presets.paper(model.config, sample_in_training=False, routing_loss_weight=0.5)
    dpn.apply_pyramid(model, config)
    dataset = LlavaDataset(data, None, family_images(model.config, processor))
    collate = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id, images=dataset.images)
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
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-4)
    optimizer = PyramidTrainer(model=model, args=args, router_learning_rate=3e-3).create_optimizer()
    router_ids = {id(p) for p in model.pyramid.parameters()}
    router_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & router_ids]
    assert len(router_groups) == 1 and router_groups[0]["lr"] == 3e-3
    assert {id(p) for p in router_groups[0]["params"]} == router_ids


# ------------------------------------------------------------------------------- dpn train's flags
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_trainer_flags_and_short_aliases_reach_the_trainer(data, tmp_path):
    options, args = parse_train_args([
        "--data", str(data), "--output", str(tmp_path / "out"), "--weight_decay", "0.1", "--max_grad_norm", "0.5",
        "--report_to", "none", "--lr_scheduler_type", "linear", "--steps", "7", "--batch-size", "3", "--lr", "1e-3",
        "--grad-accum", "2", "--router-lr", "0.02", "--init-from", "ckpt", "--image-folder", "images",
        "--freeze-vision", "--max-length", "512", "--warmup-steps", "2", "--save-steps", "5", "--logging-steps", "4",
        "--seed", "3", "--limit", "8", "--pyramid", "static:2x2", "--bf16", "false", "--gradient_checkpointing",
        "--no_progress",
    ])
    assert options == TrainOptions(data=str(data), image_folder="images", pyramid="static:2x2", init_from="ckpt",
                                   freeze_vision=True, router_learning_rate=0.02, max_length=512, limit=8,
                                   progress=False)
    model, _ = zoo.build_tiny(seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config))
    trainer = PyramidTrainer(model=model, args=args, router_learning_rate=options.router_learning_rate)
    got = trainer.args
    assert (got.weight_decay, got.max_grad_norm, got.report_to, got.lr_scheduler_type) == \
        (0.1, 0.5, [], SchedulerType.LINEAR)
    assert (got.output_dir, got.max_steps, got.per_device_train_batch_size, got.learning_rate,
            got.gradient_accumulation_steps, got.warmup_steps, got.save_steps, got.logging_steps, got.seed) == \
        (str(tmp_path / "out"), 7, 3, 1e-3, 2, 2, 5, 4, 3)
    assert got.bf16 is False and got.gradient_checkpointing is True
    groups = trainer.create_optimizer().param_groups
    assert max(g["weight_decay"] for g in groups) == 0.1 and max(g["lr"] for g in groups) == 0.02


def test_dpn_train_runs_with_trainer_flags_and_records_them(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--output", str(out), "--steps", "1", "--batch-size", "2",
                 "--limit", "4", "--logging-steps", "1", "--weight_decay", "0.1", "--max_grad_norm", "0.5",
                 "--report_to", "none", "--lr_scheduler_type", "linear", "--adam_beta1", "0.8", "--no_progress"])
    assert code == 0 and f"model written to {out}" in capsys.readouterr().out
    record = json.loads((out / "train_options.json").read_text())
    assert record["options"]["limit"] == 4 and record["options"]["pyramid"] == "paper"
    trainer_args = record["training_args"]
    assert (trainer_args["weight_decay"], trainer_args["max_grad_norm"], trainer_args["report_to"],
            trainer_args["lr_scheduler_type"], trainer_args["adam_beta1"], trainer_args["adam_beta2"]) == \
        (0.1, 0.5, [], "linear", 0.8, 0.98)
    assert (trainer_args["max_steps"], trainer_args["per_device_train_batch_size"]) == (1, 2)
    assert [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e] == [1]
    assert (out / "pyramid_config.json").is_file()
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--data", str(data), "--output", str(out), "--steps", "1", "--batch-size", "2",
                 "--limit", "4", "--no_progress"]) == 0  # the same run again: finished, nothing written
    again = capsys.readouterr()
    assert "nothing to do" in again.err and "model written" not in again.out
    assert (out / "model.safetensors").stat().st_mtime_ns == written


DPN_DEFAULTS = dict(
    max_steps=500, per_device_train_batch_size=32, learning_rate=5e-4, lr_scheduler_type=SchedulerType.COSINE,
    warmup_steps=50, adam_beta2=0.98, max_grad_norm=1.0, weight_decay=0.0, save_steps=100, save_total_limit=2,
    logging_steps=10, seed=0, report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
    save_only_model=False, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    dataloader_pin_memory=torch.cuda.is_available(),
)


def test_dpn_defaults_are_the_parsed_defaults_and_every_flag_overrides_them(data, tmp_path):
    options, args = parse_train_args(["--data", str(data), "--output", str(tmp_path)])
    assert options == TrainOptions(data=str(data))
    assert options.pyramid == "paper" and options.progress is True and options.max_length == 2048
    assert {name: getattr(args, name) for name in DPN_DEFAULTS} == DPN_DEFAULTS
    assert args.to_dict() == PyramidTrainingArguments(output_dir=str(tmp_path)).to_dict()  # the API's defaults too
    overrides = dict(max_steps="3", per_device_train_batch_size="2", learning_rate="0.1", lr_scheduler_type="constant",
                     warmup_steps="0", adam_beta2="0.9", max_grad_norm="2.0", weight_decay="0.3", save_steps="7",
                     save_total_limit="5", logging_steps="1", seed="9", report_to="tensorboard",
                     remove_unused_columns="true", dataloader_num_workers="1", save_only_model="true",
                     dataloader_pin_memory=str(not DPN_DEFAULTS["dataloader_pin_memory"]))
    assert overrides.keys() == DPN_DEFAULTS.keys() - {"bf16"}
    argv = ["--data", str(data), "--output", str(tmp_path)]
    for name, value in overrides.items():
        argv += [f"--{name}", value]
    _, args = parse_train_args(argv)
    for name in overrides:
        assert getattr(args, name) != DPN_DEFAULTS[name], name
    assert args.report_to == ["tensorboard"] and args.lr_scheduler_type == SchedulerType.CONSTANT
    # bf16 either way (on a CPU it needs --use_cpu, which also turns pinned memory off)
    assert parse_train_args([*argv[:4], "--use_cpu", "--bf16"])[1].bf16 is True
    assert parse_train_args([*argv[:4], "--bf16", "false"])[1].bf16 is False


def test_help_shows_every_trainer_flag_with_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: dpn train")
    for flag in ("--weight_decay", "--report_to", "--bf16", "--gradient_checkpointing", "--deepspeed", "--fsdp",
                 "--max_grad_norm", "--output_dir", "--output", "--steps", "--batch-size", "--lr", "--grad-accum",
                 "--router-lr", "--init-from", "--image-folder", "--freeze-vision", "--max-length", "--limit"):
        assert f" {flag} " in text or f" {flag}," in text, flag
    for shown in ("(default: cosine, dpn's; the Trainer's: linear)", "(default: 0.98, dpn's; the Trainer's: 0.999)",
                  "(default: 0.0005, dpn's;", "(default: 500, dpn's;", "(default: paper)", "(default: 2048)"):
        assert shown in text, shown
    assert "(default: None)" not in text.split("Trainer options")[0]  # dpn's own say what unset means


REQUIRED = ["--data", "d.json", "--output", "out"]


@pytest.mark.parametrize("argv, message", [
    (["--data", "d.json"], "the following arguments are required: --output_dir/--output-dir/--output"),
    (["--output", "out"], "the following arguments are required: --data"),
    ([], "the following arguments are required: --data, --output_dir"),
    ([*REQUIRED, "--weight-decay-typo", "1"], "unrecognized arguments: --weight-decay-typo"),
    ([*REQUIRED, "--steps", "many"], "argument --max_steps/--max-steps/--steps: invalid int"),
    ([*REQUIRED, "--lr_scheduler_type", "wavy"], "--lr_scheduler_type"),
])
def test_a_missing_or_bad_flag_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: dpn train" in err and message in err


def test_output_dir_is_required_from_python_too():
    with pytest.raises(TypeError, match="output_dir"):
        PyramidTrainingArguments()
    with pytest.raises(ValueError, match="output_dir is required"):
        PyramidTrainingArguments(output_dir="")


# ------------------------------------------------------------------------------- reliability
@pytest.mark.parametrize("flags, message", [
    (["--steps", "-5"], "--steps must be a positive number of optimizer steps"),
    (["--steps", "0"], "--steps must be a positive number"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--router-lr", "nan"], "--router-lr must be a positive number"),
])
def test_numbers_a_run_cannot_use_are_errors_naming_the_flag(data, tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_an_error(data, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "file")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


def test_a_half_written_checkpoint_is_skipped_and_a_finished_run_is_not_extended(data, tmp_path, capsys):
    out = train(*_options(data, tmp_path / "run"))
    final = load_file(out / "model.safetensors")
    # A kill while writing checkpoint-6 of a longer run: weights written, trainer state not yet.
    half = out / "checkpoint-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes((out / "checkpoint-4" / "model.safetensors").read_bytes()[:1000])
    capsys.readouterr()
    again = train(*_options(data, tmp_path / "run"))  # the same command: finished, nothing to do
    assert "holds a finished run (4 steps); nothing to do" in capsys.readouterr().err
    assert all(torch.equal(t, load_file(again / "model.safetensors")[k]) for k, t in final.items())
    longer = train(*_options(data, tmp_path / "run", max_steps=6, save_steps=3))
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-6: incomplete" in err and "resuming from" in err and "checkpoint-4" in err
    steps = [e["step"] for e in json.loads((longer / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((longer / "train_options.json").read_text())["global_step"] == 6


def test_the_seed_fixes_everything_routers_included(data, tmp_path):
    base, processor = zoo.build_tiny(seed=1)
    zoo.save_tiny(base, processor, tmp_path / "base")
    losses = []
    for run in ("a", "b"):
        out = train(*_options(data, tmp_path / run, init_from=str(tmp_path / "base"), max_steps=2, seed=5))
        losses.append([(e["loss"], e["routing_loss"]) for e in json.loads((out / "log_history.json").read_text())
                       if "loss" in e])
    assert losses[0] == losses[1]
    routers = [load_file(tmp_path / run / "pyramid_model.safetensors") for run in ("a", "b")]
    assert all(torch.equal(routers[0][k], routers[1][k]) for k in routers[0])


@pytest.mark.slow
def test_torchrun_trains_one_ddp_run_that_matches_one_process(data, tmp_path):
    """Two CPU processes (gloo) with 4 samples each give the losses of one process with 8."""
    eight = data.parent / "eight.json"  # beside its images
    eight.write_text(json.dumps(json.loads(data.read_text())[:8]))
    common = ["train", "--data", str(eight), "--steps", "3", "--logging-steps", "1", "--save-steps", "3",
              "--warmup-steps", "0", "--lr", "1e-3", "--pyramid", "static:2x2", "--no_progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "dpn.lab.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *common, "--batch-size", "4", "--output", str(tmp_path / "ddp")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*common, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0

    def losses(run):
        return [e["loss"] for e in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in e]

    assert len(losses("ddp")) == 3 and losses("ddp")[0] != losses("ddp")[2]  # it trained
    assert losses("ddp") == pytest.approx(losses("one"), rel=1e-4)
    assert done.stdout.count("model written to") == 2 and (tmp_path / "ddp" / "checkpoint-3").is_dir()


def test_routing_stats_report_entropy_and_each_difficultys_first_choice():
    from dpn.lab.train import routing_stats
    from dpn.outputs import PyramidRouting

    uniform, certain = torch.full((3,), 1 / 3), torch.tensor([0.0, 0.0, 1.0])
    routing = PyramidRouting(
        experts=torch.tensor([[0], [2], [2], [-1]]), expert_probability=torch.ones(4, 1),
        router_probs=[torch.stack([uniform, certain, certain, uniform])],
        visual_tokens=torch.tensor([[64, 64], [64, 16], [64, 16], [0, 0]]), layer_tokens=torch.ones(4, 2),
        flops=torch.ones(4), vanilla_flops=torch.ones(4),
    )
    stats = routing_stats(routing, None, ["easy", "hard", "easy", "hard"])
    assert stats["stage0_expert2"] == pytest.approx(2 / 3)  # drawn, among the three routed samples
    assert stats["stage0_entropy"] == pytest.approx(1 / 3, abs=1e-5)  # (1 + 0 + 0) / 3
    assert stats["stage0_hard_top2"] == 1.0  # the fourth sample (no image) is not counted
    assert stats["stage0_easy_top0"] == 0.5 and stats["stage0_easy_top2"] == 0.5
    assert "stage0_easy_top0" not in routing_stats(routing, None)


def test_released_dpn_trains_and_evaluates_with_router_tokens(data, tmp_path):
    from dpn.lab.evaluate import EvalOptions, evaluate
    from dpn.router_token import ROUTER_TOKEN

    out = train(*_options(data, tmp_path / "run", pyramid="released", max_steps=2, save_steps=2))
    model, processor = zoo.load(out)
    token_id = processor.tokenizer.convert_tokens_to_ids(ROUTER_TOKEN)
    config = dpn.PyramidConfig.load(out)
    assert config.router_input == "router_tokens_mean" and config.router_token_id == token_id
    assert model.get_input_embeddings().num_embeddings > token_id
    logs = [entry for entry in json.loads((out / "log_history.json").read_text()) if "loss" in entry]
    logged = {key for entry in logs for key in entry}
    assert {"stage0_entropy", "stage0_easy_top0", "stage0_hard_top2"} <= logged

    dpn.load_pyramid(model, out)
    dataset = LlavaDataset(data, None, family_images(model.config, processor), router_token=ROUTER_TOKEN)
    item = dataset[0]
    turns = sum(turn["from"] == "human" for turn in dataset.records[0]["conversations"])
    assert item["input_ids"].count(token_id) == turns >= 1
    assert all(label != token_id for label in item["labels"])  # written into prompts, never a target

    summary = evaluate(EvalOptions(model=str(out), data=str(data), output_dir=str(tmp_path / "eval"), limit=4,
                                   max_new_tokens=2, progress=False, plot=False, measure_latency=False))
    assert summary["overall"]["n"] == 4 and summary["pyramid"]["router_input"] == "router_tokens_mean"


# ------------------------------------------------------------------------------- LoRA (--lora-r)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_lora_target(key):
    return ".language_model." in f".{key}" and key.rsplit(".", 2)[-2] in LORA_TARGETS


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
    base, processor = zoo.build_tiny(seed=0)
    return zoo.save_tiny(base, processor, tmp_path_factory.mktemp("lora") / "base")


def test_lora_flags_reach_the_options(data, tmp_path):
    options, _ = parse_train_args(["--data", str(data), "--output", str(tmp_path), "--lora-r", "4", "--lora-target",
                                   "q_proj", "v_proj", "--lora-alpha", "16", "--lora_dropout", "0.1"])
    assert (options.lora_r, options.lora_target, options.lora_alpha, options.lora_dropout) == \
        (4, ["q_proj", "v_proj"], 16.0, 0.1)
    default, _ = parse_train_args(["--data", str(data), "--output", str(tmp_path)])
    assert (default.lora_r, default.lora_target, default.lora_alpha, default.lora_dropout) == (None, None, None, None)


def test_lora_trains_only_adapters_and_routers_and_writes_a_loadable_merged_model(data, lora_base, tmp_path, capsys):
    import peft

    from dpn.lab.evaluate import EvalOptions, evaluate

    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--output", str(out), "--init-from", str(lora_base), "--lora-r", "4",
                 "--steps", "2", "--batch-size", "2", "--save-steps", "2", "--logging-steps", "1",
                 "--warmup-steps", "0", "--lr", "1e-2", "--no_progress"])
    assert code == 0 and f"model written to {out}" in capsys.readouterr().out
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert (out / "lora" / "pyramid_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_options.json").read_text())["options"]["lora_r"] == 4

    # the output is a plain model (LoRA merged in), its pyramid beside it: what a full run writes
    saved = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k or k.startswith("pyramid.") for k in saved)
    model, processor = zoo.load(out)
    base, _ = zoo.load(lora_base)
    trained, initial = model.state_dict(), base.state_dict()
    assert trained.keys() == initial.keys()
    targets = [k for k in trained if _is_lora_target(k)]
    assert len(targets) == 7 * model.config.text_config.num_hidden_layers
    assert any("vision_tower" in k for k in trained) and any("embed_tokens" in k for k in trained)
    for key in trained.keys() - set(targets):  # the vision tower, projector, embeddings, norms: frozen
        assert torch.equal(trained[key], initial[key]), key
    assert all(not torch.equal(trained[k], initial[k]) for k in targets)  # LoRA's B left zero: the merge moved them
    dpn.load_pyramid(model, out)
    fresh = zoo.load(out)[0]
    dpn.apply_pyramid(fresh, dpn.get_pyramid_config(model))
    assert not torch.equal(model.pyramid.routers[0].up.weight, fresh.pyramid.routers[0].up.weight)

    # the adapter in lora/, put back on the base with its routers, gives the merged model's logits
    dpn.load_pyramid(base, out / "lora")
    adapted = peft.PeftModel.from_pretrained(base, out / "lora").eval()
    dataset = LlavaDataset(data, None, family_images(model.config, processor))
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id, images=dataset.images)(
        [dataset[0], dataset[1]])
    batch = {k: v for k, v in batch.items() if k not in ("labels", "difficulty")}
    with torch.no_grad():
        expected, got = model.eval()(**batch), adapted(**batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)

    summary = evaluate(EvalOptions(model=str(out), data=str(data), output_dir=str(tmp_path / "eval"), limit=2,
                                   max_new_tokens=2, progress=False, plot=False, measure_latency=False))
    assert summary["overall"]["n"] == 2


class _RestoredLora(TrainerCallback):
    """The adapter and routers the resumed run starts its first step from."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "adapter"):
            from peft import get_peft_model_state_dict

            self.step = state.global_step
            self.adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            self.routers = {k: v.detach().clone() for k, v in dpn.get_pyramid(model).state_dict().items()}


def test_lora_resumes_from_its_checkpoint_and_matches_the_uninterrupted_run(data, lora_base, tmp_path):
    lora = dict(init_from=str(lora_base), lora_r=4, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2)
    straight = train(*_options(data, tmp_path / "straight", **lora))
    with pytest.raises(KeyboardInterrupt):
        train(*_options(data, tmp_path / "killed", **lora), callbacks=[_Crash()])
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (tmp_path / "killed" / "lora").exists()
    restored = _RestoredLora()
    resumed = train(*_options(data, tmp_path / "killed", **lora), callbacks=[restored])
    assert restored.step == 2
    for got, path in ((restored.adapter, "adapter_model.safetensors"), (restored.routers, "pyramid_model.safetensors")):
        saved = load_file(checkpoint / path)
        assert got.keys() == saved.keys()
        assert all(torch.equal(got[k], saved[k]) for k in saved), path
    assert any(load_file(checkpoint / "adapter_model.safetensors")[k].abs().sum() > 0
               for k in restored.adapter if "lora_B" in k)  # trained weights, not the initial zeros
    _assert_resumed_as_straight(straight, resumed, ("model.safetensors", "pyramid_model.safetensors",
                                                  "lora/adapter_model.safetensors"))

    # continuing it with other LoRA settings, or without LoRA, is refused (not resumed from scratch)
    with pytest.raises(ValueError, match="does not match this run's .*r 4 there, 8 here.*same --lora-r"):
        train(*_options(data, tmp_path / "killed", **{**lora, "lora_r": 8, "max_steps": 6}))
    with pytest.raises(ValueError, match="holds a LoRA adapter .*resume it with the same --lora-\\* flags"):
        train(*_options(data, tmp_path / "killed", **{**lora, "lora_r": None, "max_steps": 6}))


def test_a_full_checkpoint_is_not_resumed_into_lora_or_the_reverse(lora_base, tmp_path):
    from dpn.lab.lora import add_lora
    from dpn.lab.train import check_checkpoint_kind

    full, adapter = tmp_path / "full", tmp_path / "adapter"
    full.mkdir()
    model = zoo.load(lora_base)[0]
    check_checkpoint_kind(model, full)
    wrapped = add_lora(zoo.load(lora_base)[0], rank=4)
    wrapped.save_pretrained(adapter)
    check_checkpoint_kind(wrapped, adapter)
    with pytest.raises(ValueError, match="holds full weights \\(a run without --lora-r\\)"):
        check_checkpoint_kind(wrapped, full)
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        check_checkpoint_kind(model, adapter)
    with pytest.raises(ValueError, match="target_modules"):
        check_checkpoint_kind(add_lora(zoo.load(lora_base)[0], rank=4, targets=("q_proj",)), adapter)


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "0"], "--lora-r must be at least 1, got 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-r", "4", "--lora-dropout", "-0.1"], "--lora-dropout must be in [0, 1), got -0.1"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number, got 0.0"),
    (["--lora-target", "q_proj", "--lora-alpha", "8"], "--lora-target --lora-alpha set LoRA up: give --lora-r too"),
    (["--lora-r", "4", "--lora-target", "q_proj", "qproj"],
     "--lora-target q_proj qproj: LoRA target(s) qproj match no module of the language model; its linear layers "
     "are named down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    (["--lora-r", "4", "--lora-target", "norm"], "--lora-target norm: LoRA cannot adapt the modules norm name here "
                                                 "(LlamaRMSNorm)"),
])
def test_bad_lora_flags_are_errors_naming_the_flag(data, tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_router_temperature_follows_its_schedule_through_training(data, tmp_path):
    config = dpn.presets.paper(zoo.build_tiny()[0].config, router_temperature=1.0, router_temperature_start=10.0)
    config_dir = tmp_path / "config"
    config.save(config_dir)

    class Temperatures(TrainerCallback):
        seen: list[float] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(dpn.get_pyramid(model).temperature)

    train(*_options(data, tmp_path / "run", pyramid=str(config_dir)), callbacks=[Temperatures()])
    assert Temperatures.seen == pytest.approx([10.0, 7.0, 4.0, 1.0])  # 4 steps, from the start to the end
    model = dpn.load_pyramid(zoo.load(tmp_path / "run")[0], tmp_path / "run")
    assert dpn.get_pyramid(model.eval()).temperature == 1.0  # inference: the configured temperature
    with pytest.raises(ValueError, match="router_temperature_start must be a finite number > 0"):
        dpn.presets.paper(model.config, router_temperature_start=0.0)


def _pooling_batch(data, experts):
    """A tiny LLaVA with one random-routed stage of ``experts`` at layer 1, and a batch of 4 samples."""
    model, processor = zoo.build_tiny(seed=0)
    images = family_images(model.config, processor)
    batch = LlavaCollator(processor.tokenizer.pad_token_id, images)(
        [LlavaDataset(data, None, images)[i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if k != "difficulty"}
    dpn.apply_pyramid(model, dpn.PyramidConfig(stages=[{"layer": 1, "experts": experts}],
                                               strategy=dpn.RandomConfig()))
    return model, batch


def test_distillation_is_zero_for_an_identity_pyramid(data):
    from dpn.lab.train import distillation_loss, full_path_forward

    model, batch = _pooling_batch(data, [(1, 1), (2, 2)])
    with torch.no_grad():
        teacher = full_path_forward(model, model, batch, train=False).logits
        kept = distillation_loss(model(**batch, force_experts=0), teacher, batch["labels"])
        pooled = distillation_loss(model(**batch, force_experts=1), teacher, batch["labels"])
    assert kept == pytest.approx(0.0, abs=1e-6) and pooled > 1e-4
    assert dpn.has_pyramid(model)  # the teacher's pass gives the pyramid back


@pytest.mark.parametrize("weights", [dict(full_path_weight=0.5), dict(distill_weight=2.0),
                                     dict(full_path_weight=0.5, distill_weight=2.0)])
def test_full_path_and_distillation_terms_add_up(data, tmp_path, weights):
    """The trainer's loss (and its gradient) is the drawn path's LM loss + w x the full-detail path's LM
    loss + d x KL(full || drawn), the full path trained only when w > 0."""
    from dpn.lab.train import PyramidTrainer, distillation_loss

    model, batch = _pooling_batch(data, [(2, 2)])  # one expert: the drawn path is known
    model.train()
    trainer = PyramidTrainer(model=model, args=PyramidTrainingArguments(output_dir=str(tmp_path), report_to=[]),
                             **weights)
    trainer.current_gradient_accumulation_steps = 1
    parameter = model.get_input_embeddings().weight
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = parameter.grad.clone()
    parameter.grad = None
    pooled = model(**batch)
    with dpn.pyramid_disabled(model):
        full = model(**batch)
    expected = pooled.loss + weights.get("full_path_weight", 0) * full.loss
    expected = expected + weights.get("distill_weight", 0) * distillation_loss(pooled, full.logits.detach(),
                                                                               batch["labels"])
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(got, parameter.grad, rtol=1e-4, atol=1e-7)
    assert loss.item() > pooled.loss.item()  # each term adds something


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_full_path_weight_trains_and_is_recorded(data, tmp_path):
    out = train(*_options(data, tmp_path / "run", full_path_weight=0.5, distill_weight=0.5))
    assert json.loads((out / "train_options.json").read_text())["options"]["full_path_weight"] == 0.5
    with pytest.raises(ValueError, match="--full_path_weight must be a number >= 0"):
        train(*_options(data, tmp_path / "bad", full_path_weight=-1.0))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        train(*_options(data, tmp_path / "bad", full_path_weight=1.0, gradient_checkpointing=True))