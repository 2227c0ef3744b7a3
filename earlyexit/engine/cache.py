"""The engine's KV cache and attention masks: fixed buffers written at per-row slots, masks built from slots.

Rows of one batch may sit at different positions (speculation accepts a different number of tokens per row,
prompts are left-padded), so where a token's keys go is a per-row *slot*, and what a query sees is decided by
the mask alone: causal by slot, valid (not padding), and within the block's sliding window.
"""

from __future__ import annotations

import torch


class StaticKV:
    """Fixed-size key/value buffers, one pair per layer, written at per-row slots.

    The model's attention calls :meth:`update` with the new keys and values of the rows it ran; a layer's
    buffers are allocated on first use with that many rows (so a layer only the deepest exits reach holds only
    their rows) and ``capacity`` slots. ``slots`` (``[R, q]``) says where each row's q new tokens go; the mask
    decides what is read, so stale slots past a row's position (rejected drafts) are never attended to.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: torch.Tensor | None = None
        self.key_stack: torch.Tensor | None = None  # see stack()
        self.value_stack: torch.Tensor | None = None

    def stack(self, layers: int, rows: int, heads: int, dim: int, dtype: torch.dtype, device) -> None:
        """Allocate layers 0..``layers`` − 1 as slices of one ``[layers, rows, heads, capacity, dim]`` pair, so that
        :meth:`update_layers` writes them all at once."""
        self.key_stack = torch.zeros(layers, rows, heads, self.capacity, dim, dtype=dtype, device=device)
        self.value_stack = torch.zeros_like(self.key_stack)
        for layer in range(layers):
            self.keys[layer], self.values[layer] = self.key_stack[layer], self.value_stack[layer]

    def update_layers(self, key: torch.Tensor, value: torch.Tensor, first: int) -> None:
        """Write layers ``first``, ``first`` + 1, …'s new keys and values (``[L, R, heads, q, dim]``) at ``slots`` into
        the buffers :meth:`stack` allocated, in one write."""
        count, rows, heads, q, _ = key.shape
        device = key.device
        at = (torch.arange(first, first + count, device=device)[:, None, None, None],
              torch.arange(rows, device=device)[None, :, None, None], torch.arange(heads, device=device)[None, None, :, None],
              self.slots[None, :rows, None, :])
        self.key_stack.index_put_(at, key)
        self.value_stack.index_put_(at, value)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows, heads, q, dim = key.shape
        if layer_idx not in self.keys:
            self.keys[layer_idx] = key.new_zeros(rows, heads, self.capacity, dim)
            self.values[layer_idx] = value.new_zeros(rows, heads, self.capacity, value.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # an indexed write, not a scatter: compiled, it stays in place and writes only the new slots
        at = (torch.arange(rows, device=key.device)[:, None, None], torch.arange(heads, device=key.device)[None, :, None],
              self.slots[:rows, None, :])
        keys.index_put_(at, key)
        values.index_put_(at, value)
        return keys, values


def additive_mask(slots: torch.Tensor, valid: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``[R, 1, q, S]`` additive mask: query at slot s sees valid keys at slots ≤ s (and > s − window).

    Args:
        slots: ``[R, q]`` the queries' slots.
        valid: ``[R, S]`` whether each slot holds a real token (prompt padding does not).
        window: the block's sliding window, or None for full attention.
    """
    keys = torch.arange(valid.shape[1], device=slots.device)
    seen = (keys[None, None, :] <= slots[:, :, None]) & valid[:, None, :]
    if window is not None:
        seen &= keys[None, None, :] > slots[:, :, None] - window
    zero = torch.zeros((), dtype=dtype, device=slots.device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[:, None]
