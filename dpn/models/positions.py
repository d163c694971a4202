"""Position policies: which positions tokens have, and keep, as a pyramid shortens the sequence.

A policy belongs to a model family's adapter: 1-D positions for Llama-style decoders
(``LinearPositions``), three axes for Qwen2-VL (``MultimodalRotaryPositions``). The shared
config's ``positions`` mode chooses between renumbering the shortened sequence and keeping each
token's original position, among the modes the policy offers (``modes``, its default first).
"""

from __future__ import annotations

import torch


class LinearPositions:
    """One position per token, shape (batch, length): what Llama, Qwen2 and Mistral decoders take.
    Both modes: ``"renumber"`` (the paper) and ``"keep"``.

    Decoding continues from the input's positions: a segment whose positions were renumbered keeps
    a per-sample *shift* (input position - segment position) in the cache, and a decoding step's
    position in that segment is its input position minus the shift.
    """

    modes = ("renumber", "keep")

    def initial(self, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, length: int,
                past_length: int, device: torch.device) -> torch.Tensor:
        """The call's input positions; without ``position_ids``, derived from ``attention_mask`` so
        that padding never shifts a sample's positions."""
        if position_ids is not None:
            if position_ids.ndim != 2:
                raise ValueError(f"position_ids must be (batch, tokens), got shape {tuple(position_ids.shape)}")
            return position_ids.to(device).expand(batch, -1)
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:].to(device)
        return torch.arange(past_length, past_length + length, device=device).expand(batch, -1)

    def gather(self, positions: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Positions of the tokens at ``flat_index`` (sample * length + position), in its shape."""
        return positions.flatten()[flat_index]

    def after_shrink(self, stands_for: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
        """Positions of a shortened batch: ``stands_for`` holds, per new token, the position of the
        token it stands for; ``renumber`` makes each sample's positions consecutive from its first."""
        if mode == "keep":
            return torch.where(valid, stands_for, 0)
        first_valid = valid.int().argmax(1)
        start = stands_for[torch.arange(valid.shape[0], device=valid.device), first_valid]
        return torch.where(valid, start[:, None] + valid.long().cumsum(1) - 1, 0)

    def at(self, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(batch,) the position of each sample's token at ``index``."""
        return positions.gather(1, index[:, None]).squeeze(1)

    def shifted(self, positions: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
        """Positions minus each sample's shift (the same tensor for no shift: segments share its rotary)."""
        if not torch.is_tensor(shift) and shift == 0:
            return positions
        return positions - (shift[:, None] if torch.is_tensor(shift) else shift)

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor | None:
        """What the decoder layers get as ``position_ids`` (the rotary embedding is computed apart)."""
        return positions

    def mask_position_ids(self, positions: torch.Tensor) -> torch.Tensor | None:
        """What the mask builder gets as ``position_ids``."""
        return positions


class MultimodalRotaryPositions:
    """Qwen2-VL's M-RoPE: three positions per token (temporal, height, width), shape (3, batch, length).

    Text tokens have the same position on every axis; a visual token has its frame, row and column
    (offset by the text before it); the text after an image continues after the image's largest
    coordinate. A pyramid keeps this coordinate space (mode ``"keep"``, the only one): a kept token
    keeps its coordinates, a pooled window takes those of its first (top-left) token, text keeps
    its own, and decoding continues exactly as in the stock model (input position + rope delta).
    Renumbering has no single meaning across three axes, so it is not offered.
    """

    modes = ("keep",)

    def gather(self, positions: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        return positions.flatten(1)[:, flat_index]

    def after_shrink(self, stands_for: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
        if mode != "keep":
            raise ValueError(f"M-RoPE positions are kept in their coordinate space; positions={mode!r} is not available")
        return torch.where(valid, stands_for, 0)

    def at(self, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return positions[0].gather(1, index[:, None]).squeeze(1)

    def shifted(self, positions: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(shift) and shift == 0:
            return positions
        return positions - (shift[None, :, None] if torch.is_tensor(shift) else shift)

    def layer_position_ids(self, positions: torch.Tensor) -> None:
        return None  # as in the stock text model: 3-axis positions only reach the rotary embedding

    def mask_position_ids(self, positions: torch.Tensor) -> None:
        return None
