"""DPN as released (aihao2000/DPN-LLaVA) beside the paper's defaults: the global hinge and the
re-sampling guard on kept visual tokens."""

from __future__ import annotations

import pytest
import torch

import dpn
from helpers import batch_of, make_prompt, pixels, tiny_llava


def _pyramid_module(routing_loss: str):
    model = tiny_llava(seed=0)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config, routing_loss=routing_loss))
    return dpn.get_pyramid(model)


def test_global_hinge_is_one_hinge_over_the_mean_of_the_stages():
    """Stage A compresses confidently (2 x 1.0 = 2.0 > target 1.5), stage B not at all (0): the paper's
    per-stage hinge averages max(0, 1.5 - 2) and max(0, 1.5 - 0); the released one hinges their mean."""
    compressing = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    keeping = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    per_stage = _pyramid_module("hinge").hinge_loss([compressing, keeping])
    released = _pyramid_module("hinge_global").hinge_loss([compressing, keeping], per_stage=False)
    assert per_stage.item() == pytest.approx((0 + 1.5) / 2)
    assert released.item() == pytest.approx(1.5 - (2.0 + 0.0) / 2)


def _kept_after_training_forwards(min_kept_tokens, forwards: int = 12) -> torch.Tensor:
    model = tiny_llava(seed=1)
    dpn.apply_pyramid(model, dpn.presets.paper(model.config, min_tokens_to_pool=4, min_kept_tokens=min_kept_tokens))
    dpn.set_router_bias(model, 3.0)  # routers lean hard toward compressing, so guarded paths get drawn
    model.train()
    batch = batch_of([make_prompt(2, 3, seed=i) for i in range(4)])
    kept = []
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(forwards):
            kept.append(model(**batch, pixel_values=pixels(4)).routing.visual_tokens)
    return torch.cat(kept)


def test_min_kept_tokens_never_draws_a_path_below_it_in_training():
    unguarded = _kept_after_training_forwards(None)
    guarded = _kept_after_training_forwards(10)
    assert (unguarded < 10).any()  # the 64 -> 16 -> 4 path is drawn without the guard
    assert (guarded >= 10).all()
    assert (guarded[:, 1] == 16).any()  # the guard still lets the first stage compress 2x2


def test_min_kept_tokens_is_checked():
    model = tiny_llava()
    with pytest.raises(ValueError, match="min_kept_tokens must be an int >= 1"):
        dpn.presets.paper(model.config, min_kept_tokens=0)
