"""A KV cache whose decoder layers hold sequences of different lengths.

After a pyramid stage the sequence is shorter, so the layers of each *segment* (the layers between
two stages) cache their own, shorter, re-padded layout. ``PyramidCache`` is a ``DynamicCache``
that also remembers, per segment, which cached keys are real tokens (``key_masks``) and how far
that segment's rotary positions lag behind the input positions (``position_shift``), so decoding
steps build masks and positions consistent with prefill. A family adapter may keep per-sample
state of its own there too (``family_state``, e.g. Qwen2-VL's rope deltas). It travels through
``generate`` like any cache, so the pyramid keeps no per-call state on the model.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PyramidCache(DynamicCache):
    def __init__(self, config=None, num_segments: int = 1) -> None:
        super().__init__(config=config)
        self.num_segments = num_segments
        self.key_masks: list[torch.Tensor | None] = [None] * num_segments
        self.position_shift: list[torch.Tensor | None] = [None] * num_segments
        self.family_state: dict[str, torch.Tensor] = {}  # per-sample tensors (batch first) of the family adapter

    def past_mask(self, segment: int, batch_size: int, device: torch.device) -> torch.Tensor:
        mask = self.key_masks[segment]
        if mask is None:
            return torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return mask

    def input_length(self) -> int:
        """Tokens cached in the input's own layout (segment 0; it may own no layer, e.g. projector pooling)."""
        mask = self.key_masks[0]
        return 0 if mask is None else mask.shape[1]

    def shift(self, segment: int) -> torch.Tensor | int:
        shift = self.position_shift[segment]
        return 0 if shift is None else shift

    def record(self, segment: int, key_mask: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Record which keys ``segment`` holds after this call (``key_mask``: its past keys' mask with the
        call's tokens appended, as its layers attended to them) and its new position shift."""
        self.key_masks[segment] = key_mask
        if shift is not None:
            self.position_shift[segment] = shift

    def _map_state(self, fn) -> None:
        mapped: dict[int, torch.Tensor] = {}  # segments that shared a tensor (e.g. a shift) keep sharing it

        def once(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if id(tensor) not in mapped:
                mapped[id(tensor)] = fn(tensor)
            return mapped[id(tensor)]

        self.key_masks = [once(m) for m in self.key_masks]
        self.position_shift = [once(s) for s in self.position_shift]
        self.family_state = {k: once(v) for k, v in self.family_state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                "PyramidCache.crop takes a negative number of tokens to remove from the end; an absolute length is "
                "ambiguous when segments hold different lengths"
            )
        super().crop(tokens_to_remove)
        if tokens_to_remove:
            self.key_masks = [None if m is None else m[:, :tokens_to_remove] for m in self.key_masks]

    def reset(self) -> None:
        super().reset()
        self.key_masks = [None] * self.num_segments
        self.position_shift = [None] * self.num_segments
        self.family_state = {}
