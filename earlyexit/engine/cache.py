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
        self.stacks: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # see stack()

    def stack(self, layers: list[int], rows: int, heads: int, dim: int, dtype: torch.dtype, device) -> None:
        """Allocate cache layers ``layers`` as slices of one ``[len(layers), rows, heads, capacity, dim]`` pair, so that
        :meth:`stacked` hands consecutive ones to one batched write."""
        keys = torch.zeros(len(layers), rows, heads, self.capacity, dim, dtype=dtype, device=device)
        values = torch.zeros_like(keys)
        for i, layer in enumerate(layers):
            self.keys[layer], self.values[layer] = keys[i], values[i]
        self.stacks.append((list(layers), keys, values))

    def stacked(self, first: int, stop: int, layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[L, R, heads, capacity, dim]`` views of the stacked cache layers ``first``..``stop`` − 1 (or exactly
        ``layers``, which must be consecutive in one stack)."""
        wanted = list(range(first, stop)) if layers is None else list(layers)
        for stacked, keys, values in self.stacks:
            if wanted[0] in stacked:
                start = stacked.index(wanted[0])
                if stacked[start : start + len(wanted)] == wanted:
                    return keys[start : start + len(wanted)], values[start : start + len(wanted)]
        raise KeyError(f"cache layers {wanted} are not stacked together")

    def layer(self, layer_idx: int, rows: int, heads: int, dim: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache layer ``layer_idx``'s ``[R, heads, capacity, dim]`` keys and values, allocated on first use with ``rows``
        rows (so a layer only the deepest exits reach holds only their rows)."""
        if layer_idx not in self.keys:
            self.keys[layer_idx] = torch.zeros(rows, heads, self.capacity, dim, dtype=dtype, device=device)
            self.values[layer_idx] = torch.zeros_like(self.keys[layer_idx])
        return self.keys[layer_idx], self.values[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The model's own attention's write (the generic path): ``key``/``value`` ``[R, heads, q, dim]`` at ``slots``."""
        rows, heads, q, dim = key.shape
        keys, values = self.layer(layer_idx, rows, heads, dim, key.dtype, key.device)
        write(keys, values, key, value, self.slots)
        return keys, values


def write(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[..., R, k, q, d]`` into ``keys``/``values`` ``[..., R, k, S, d]`` at ``slots`` ``[R, q]``
    (or ``[..., R, q]``: each leading index its own slots): an indexed write, not a scatter (compiled, it stays in
    place and writes only the new slots)."""
    *lead, rows, heads, q, _ = key.shape
    at = tuple(torch.arange(size, device=key.device).view(-1, *[1] * (len(lead) - i + 2)) for i, size in enumerate(lead))
    at += (torch.arange(rows, device=key.device)[:, None, None], torch.arange(heads, device=key.device)[None, :, None],
           slots[..., :rows, None, :])
    keys.index_put_(at, key)
    values.index_put_(at, value)


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
