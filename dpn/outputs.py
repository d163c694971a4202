"""What a pyramid forward returns: the usual LM outputs plus what the pyramid did to each sample."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

import torch
from transformers.modeling_outputs import ModelOutput
from transformers.cache_utils import Cache

from dpn.compat import CACHE_ARGUMENT


@dataclass
class PyramidRouting:
    """Per-sample record of one forward (one prefill chunk) through the pyramid.

    Attributes:
        experts: (batch, stages) chosen expert index per stage; -1 where the sample was not routed
            (no image, or its images below ``min_tokens_to_pool``).
        expert_probability: (batch, stages) probability of the chosen expert.
        router_probs: one (batch, experts_of_stage) tensor per stage.
        visual_tokens: (batch, stages + 1) visual tokens before the first stage and after each stage.
        layer_tokens: (batch, layers) tokens each decoder layer processed for the sample.
        flops: (batch,) LLM decoder FLOPs spent on the sample (see ``dpn.flops``).
        vanilla_flops: (batch,) the same without the pyramid.
    """

    experts: torch.Tensor
    expert_probability: torch.Tensor
    router_probs: list[torch.Tensor]
    visual_tokens: torch.Tensor
    layer_tokens: torch.Tensor
    flops: torch.Tensor
    vanilla_flops: torch.Tensor

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.vanilla_flops.clamp(min=1)


_OUTPUT_DOC = """``LlavaCausalLMOutputWithPast`` fields plus the pyramid's.

    ``logits``, ``labels``, ``attention_mask`` and ``position_ids`` are in the final (shortened,
    left-padded) layout: ``labels`` are the input labels carried along with their tokens, so ``loss``
    can be recomputed from ``logits`` and ``labels`` as for any causal LM; ``position_ids`` are the
    positions the last layers ran with ((3, batch, length) for M-RoPE families).
    ``routing_loss`` is computed when the call has labels or the pyramid is training.
    The KV cache is the field the installed transformers names it (``dpn.compat.CACHE_ARGUMENT``:
    ``cache`` from 5.24, ``past_key_values`` before), since ``generate`` reads it by that name;
    ``dpn.compat.output_cache(output)`` reads it on any release.
    """

# Built with make_dataclass because the cache field's name depends on the transformers release.
PyramidCausalLMOutput = make_dataclass(
    "PyramidCausalLMOutput",
    [
        ("loss", torch.Tensor | None, field(default=None)),
        ("logits", torch.Tensor | None, field(default=None)),
        (CACHE_ARGUMENT, Cache | None, field(default=None)),
        ("hidden_states", tuple[torch.Tensor, ...] | None, field(default=None)),
        ("attentions", tuple[torch.Tensor, ...] | None, field(default=None)),
        ("image_hidden_states", torch.Tensor | None, field(default=None)),
        ("lm_loss", torch.Tensor | None, field(default=None)),
        ("routing_loss", torch.Tensor | None, field(default=None)),
        ("routing", PyramidRouting | None, field(default=None)),
        ("labels", torch.Tensor | None, field(default=None)),
        ("attention_mask", torch.Tensor | None, field(default=None)),
        ("position_ids", torch.Tensor | None, field(default=None)),
    ],
    bases=(ModelOutput,),
    namespace={"__doc__": _OUTPUT_DOC, "__module__": __name__},
)
