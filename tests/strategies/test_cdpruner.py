"""CDPruner (a DPP conditioned on the instruction, before the LLM): its greedy against the log-determinant
it maximises, its relevance, its defaults, FLOPs and families. The contract every peer meets (kept
counts, batched == alone, cached == recomputed, a training step) runs for it in test_peers.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dpn
from dpn.strategies.cdpruner import CDPRUNER_KEEP_RATIO, greedy_dpp, instruction_relevance
from dpn.strategies.selection import kept_count
from helpers import (
    GRID, IMAGE_TOKEN_ID, batch_of, check_selection_flops_match_counter, first_layer_input, make_prompt, pixels,
    tiny_llava,
)

VISUAL = GRID[0] * GRID[1]
KEEP = 0.3


def _greedy_by_determinants(kernel: torch.Tensor, keep: int) -> list[int]:
    """The greedy MAP by its definition: each step adds the item whose kept set has the largest determinant."""
    chosen: list[int] = []
    for _ in range(keep):
        candidates = [i for i in range(kernel.shape[0]) if i not in chosen]
        determinants = [torch.det(kernel[chosen + [i]][:, chosen + [i]].double()) for i in candidates]
        chosen.append(candidates[int(torch.stack(determinants).argmax())])
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(4))
def test_the_fast_greedy_picks_what_the_determinants_pick(seed):
    g = torch.Generator().manual_seed(seed)
    unit = F.normalize(torch.randn(12, 6, generator=g), dim=-1)
    relevance = torch.rand(12, generator=g) + 0.1
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    for keep in (1, 3, 6):
        assert greedy_dpp(kernel, keep).tolist() == _greedy_by_determinants(kernel, keep)


def test_the_first_pick_is_the_most_relevant_then_diversity_beats_a_near_duplicate():
    # Tokens 0 and 1 point the same way; 2 is orthogonal but less relevant.
    unit = torch.tensor([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]])
    relevance = torch.tensor([1.0, 0.95, 0.6])
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    assert greedy_dpp(kernel, 1).tolist() == [0]
    assert greedy_dpp(kernel, 2).tolist() == [0, 2]  # 1's gain is tiny after 0; 2 keeps its 0.36
    assert greedy_dpp(kernel, 5).tolist() == [0, 1, 2]  # never more than there are


def test_a_kernel_of_low_rank_still_gives_distinct_picks_without_nan():
    unit = F.normalize(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), dim=-1)  # rank 2
    kept = greedy_dpp(unit @ unit.T, 5)
    assert kept.unique().numel() == 5


def test_relevance_is_the_mean_cosine_scaled_over_the_image_and_the_reference_sign_is_an_option():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    instruction = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    score = torch.tensor([0.8, 0.4, 0.8])  # mean cosines
    expected = (score - 0.4 + 1e-6) / 0.4
    torch.testing.assert_close(instruction_relevance(visual, instruction), expected)
    torch.testing.assert_close(instruction_relevance(visual, instruction, negate=True), (-score + 0.8 + 1e-6) / 0.4)
    assert instruction_relevance(visual[:1].expand(3, 2), instruction).tolist() == [1.0, 1.0, 1.0]  # a tie: all alike


def test_spec_preset_and_the_kept_rows_follow_the_rule():
    model = tiny_llava(seed=1)
    config = dpn.presets.from_spec("cdpruner", model.config)
    assert (config.stages[0].layer, config.stages[0].keep_ratio, config.positions) == (-1, CDPRUNER_KEEP_RATIO,
                                                                                       "renumber")
    dpn.apply_pyramid(model, dpn.presets.from_spec(f"cdpruner:{KEEP}", model.config))
    batch = {**batch_of([make_prompt(3, 4, seed=1)]), "pixel_values": pixels(1)}
    with dpn.pyramid_disabled(model):
        original, _ = first_layer_input(model, batch)  # the text embeddings and the projected image rows
    received, out = first_layer_input(model, batch)
    ids = batch["input_ids"][0]
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    image = original[0, start:start + VISUAL]
    instruction = F.normalize(original[0, start + VISUAL:].float(), dim=-1)  # the text after the image, query included
    unit = F.normalize(image.float(), dim=-1)
    relevance = instruction_relevance(unit, instruction)
    kept = _greedy_by_determinants(relevance[:, None] * (unit @ unit.T) * relevance[None, :], kept_count(VISUAL, KEEP))
    torch.testing.assert_close(received[0, start:start + len(kept)], image[kept])
    assert out.routing.visual_tokens[0].tolist() == [VISUAL, kept_count(VISUAL, KEEP)]


def test_flops_match_the_flop_counter():
    check_selection_flops_match_counter(lambda model: dpn.presets.from_spec(f"cdpruner:{KEEP}", model.config), KEEP)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="cdpruner prunes once, before the LLM"):
        dpn.PyramidConfig(stages=[dpn.SelectionStage(1, keep_ratio=0.5)], strategy=dpn.CDPrunerConfig())
    with pytest.raises(ValueError, match="negate_relevance"):
        dpn.CDPrunerConfig(negate_relevance="yes")
    with pytest.raises(ValueError, match="pyramid spec 'cdpruner:2'"):
        dpn.presets.from_spec("cdpruner:2", tiny_llava().config)
