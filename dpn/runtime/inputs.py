"""What a forward call brings, checked and put in the runtime's terms: the arguments sorted by who
consumes them, which tokens are real, where each sample's query token is, and forced experts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from dpn.compat import CACHE_ARGUMENTS, pop_cache
from dpn.supervision import supervised_tokens
from dpn.spans import VisualSpans
from dpn.transfer import host_tensor

# Passed on to the model's loss function (the Trainer's token count for gradient accumulation).
LOSS_ARGUMENTS = ("num_items_in_batch",)


@dataclass
class CallArguments:
    """A forward call's arguments: those of every stock causal-LM forward, which the runtime
    consumes, then the family adapter's (``family``) and the loss function's (``loss``)."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cache: Any = None  # passed as ``cache`` or ``past_key_values`` (``dpn.compat``)
    inputs_embeds: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    use_cache: bool | None = None
    logits_to_keep: int | torch.Tensor = 0
    output_hidden_states: bool | None = None
    output_attentions: bool | None = None
    return_dict: bool | None = None
    cache_position: torch.Tensor | None = None  # the cache knows its own length; accepted, not needed
    family: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def names(cls) -> frozenset[str]:
        """The arguments the runtime consumes itself (the cache under each name a release uses)."""
        return _RUNTIME_NAMES

    @classmethod
    def sort(cls, arguments: dict[str, Any], family_names: tuple[str, ...]) -> CallArguments:
        """Sort ``arguments`` by consumer; an argument nobody consumes is an error, not silently dropped."""
        runtime_names = cls.names()
        arguments = dict(arguments)
        cache = pop_cache(arguments)
        call = cls(cache=cache, **{name: value for name, value in arguments.items() if name in runtime_names})
        for name, value in arguments.items():
            if name in runtime_names:
                continue
            if name in family_names:
                call.family[name] = value
            elif name in LOSS_ARGUMENTS:
                call.loss[name] = value
            elif value is not None:
                raise ValueError(f"{name} is not supported with a pyramid (call dpn.remove_pyramid(model) to use it)")
        if call.output_attentions:
            raise ValueError(
                "output_attentions is not available with a pyramid (sequence lengths change between layers); "
                "call dpn.remove_pyramid(model) to inspect attention maps"
            )
        if (call.input_ids is None) == (call.inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return call


_RUNTIME_NAMES = frozenset(f.name for f in fields(CallArguments)) - {"family", "loss", "cache"} | set(CACHE_ARGUMENTS)

def chunk_validity(attention_mask, batch: int, length: int, past_length: int, device) -> torch.Tensor:
    """(batch, length) bool: which tokens of this call are real (not padding)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.ndim != 2:
        raise ValueError(f"a pyramid needs a 2D attention mask (batch, tokens), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape != (batch, past_length + length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds {past_length} tokens and the "
            f"input has {length}: expected {(batch, past_length + length)}"
        )
    return attention_mask[:, past_length:].to(device=device, dtype=torch.bool)


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """(batch,) index of each sample's last real token."""
    length = valid.shape[1]
    return length - 1 - valid.flip(1).int().argmax(1)


def no_query(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), -1, dtype=torch.long, device=device)


def query_index(config, is_router: torch.Tensor | None, valid: torch.Tensor, labels, spans: VisualSpans,
                required: bool) -> torch.Tensor:
    """Position whose hidden state each sample's routers (and FastV / PyramidDrop's ranking) read:
    the last router token (``is_router``: see ``router_tokens``) or the last prompt token; with
    ``required``, every sample with an image must have one."""
    if is_router is not None:
        found = is_router.any(1)
        if required:  # checked once per call, not at every stage
            found_in = found.tolist()
            missing = sorted({b for b in spans.sample if not found_in[b]})
            if missing:
                raise ValueError(f"samples {missing} have an image but no router token (id {config.router_token_id}); "
                                 "add the router token to their prompts")
        return torch.where(found, last_valid(is_router), -1)
    last = last_valid(valid)
    if labels is None:
        return last
    # The last prompt token is the one before the first supervised token.
    supervised = supervised_tokens(labels, valid)
    has_answer = supervised.any(1)
    before_answer = (supervised.int().argmax(1) - 1).clamp(min=0)
    return torch.where(has_answer, before_answer, last)


def router_tokens(config, input_ids, valid: torch.Tensor) -> torch.Tensor | None:
    """(batch, length) bool: the real router tokens, when the config reads router tokens; else None."""
    if not config.reads_router_tokens:
        return None
    if input_ids is None:
        raise ValueError(f"router_input={config.router_input!r} needs input_ids to find the router tokens")
    return (input_ids == config.router_token_id) & valid


def forced_experts(force_experts: Any, batch: int, strategy, device) -> list[torch.Tensor] | None:
    """Normalise ``force_experts`` to one (batch,) tensor per stage, checking ranges."""
    if force_experts is None:
        return None
    stages = len(strategy.config.stages)
    if not any(strategy.num_choices(stage) for stage in range(stages)):
        raise ValueError(f"force_experts applies to pooling strategies; {strategy.strategy_config.name} has no experts to force")
    try:
        forced = torch.as_tensor(force_experts).cpu()  # checked on the host
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"force_experts are expert indices (ints; -1 lets the router decide), got {force_experts!r}") \
            from None
    if forced.is_floating_point() or forced.is_complex() or forced.dtype == torch.bool:
        raise ValueError(f"force_experts are expert indices (ints; -1 lets the router decide), got {force_experts!r}")
    forced = forced.long()
    if forced.ndim == 0:
        forced = forced.expand(batch, stages)
    elif forced.ndim == 1:
        if forced.shape[0] != stages:
            raise ValueError(f"force_experts has {forced.shape[0]} entries but the pyramid has {stages} stages")
        forced = forced.expand(batch, stages)
    elif forced.shape != (batch, stages):
        raise ValueError(f"force_experts must be (batch, stages) = {(batch, stages)}, got {tuple(forced.shape)}")
    for stage in range(stages):
        column = forced[:, stage]
        choices = strategy.num_choices(stage)
        if bool((column < -1).any()) or bool((column >= choices).any()):
            raise ValueError(
                f"force_experts for stage {stage} must be -1 (router decides) or an expert index in 0..{choices - 1}"
            )
    forced = host_tensor(forced.tolist(), device)  # a queued copy: the bench forces every timed forward
    return [forced[:, stage] for stage in range(stages)]
