"""A skipping step's small work as GPU kernels (Triton): its learned check as one kernel, in place of the three to
four that ``torch.compile`` makes of :func:`~earlyexit.engine.dynamic.decide`; a skipped position kept waiting
(:func:`fused_wait`) and the step's last bookkeeping (:func:`fused_advance`), one launch each where they were five
and about seven.

Profiled on an H100 (SmolLM2 at batch 1, docs/decoding.md), a check cost 1.28 layers, and the compiled
:func:`decide` was three kernels a check (the per-row norm, probe and comparison; the state, stash and output writes;
the flags' all/any over the rows) plus the final layer's decision in every step, and four copies a step more: its
inputs are views into stacked buffers (a check's flags, the probe's bias, the layer number) whose offsets are not
16-byte aligned, which the compiled code copies before it runs. :func:`fused_decide` does the same arithmetic in one
kernel launch that takes the views as they are: one program walks the rows in tiles (the flags need every row, and a
decode step has few), so it reads each row's state once and writes the flags without a second pass. Measured: a check
1.08 layers, 13 launches a step fewer (docs/decoding.md).

Only the cases a skipping step with the learned measure meets are fused (a learned or the final decision, no head
read, no previous state, contiguous buffers); anything else goes to the compiled :func:`decide` given as
``fallback``. The arithmetic is :func:`decide`'s: the pending residual add rounded to the hidden dtype, features
(:func:`~earlyexit.probe.features`) in float32, the probe's logit, a sigmoid against the threshold; only the order of
the float32 sums differs (as between any two compilations).
"""

from __future__ import annotations

from typing import Callable

import torch

TILE = 8192
"""Elements of one tile of rows a program holds at once (rows × the hidden size rounded up to a power of two)."""


def _kernel(name: str = "learned_check"):
    """A Triton kernel of :mod:`earlyexit.engine.kernels`, imported at its first use (Triton is there only with CUDA
    builds of torch, and ``TRITON_INTERPRET`` set by then applies)."""
    from earlyexit.engine import kernels

    return getattr(kernels, name)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def available(device: torch.device | str) -> bool:
    """Whether the fused check can run on ``device``: a CUDA device with Triton."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_decide(fallback: Callable) -> Callable:
    """:func:`~earlyexit.engine.dynamic.decide`'s signature: its learned and final decisions as one kernel, the rest
    through ``fallback`` (the compiled :func:`decide`)."""

    def run(hidden, exited, state, layer, at, limit, measure, final=False, *, delta=None, out=None, logits=None,
            previous=None, read=None, adapted=None, chosen=None, weight=None, offset=None, ended=None, flags=None,
            stash=None, pending=None):
        buffers = [hidden, state, *(t for t in (delta, out, adapted, stash, pending) if t is not None)]
        if (not (final or measure == "learned") or logits is not None or read is not None
                or (flags is not None and ended is None) or (pending is not None and (delta is None or out is None))
                or not all(t.is_contiguous() for t in buffers)):
            return fallback(hidden, exited, state, layer, at, limit, measure, final, delta=delta, out=out, logits=logits,
                            previous=previous, read=read, adapted=adapted, chosen=chosen, weight=weight, offset=offset,
                            ended=ended, flags=flags, stash=stash, pending=pending)
        rows, width = hidden.shape[0], hidden.shape[-1]
        block_d = _pow2(width)
        block_r = max(1, min(TILE // block_d, _pow2(rows)))
        unused = exited  # any tensor: a pointer the kernel never reads where its constexpr says so
        _kernel()[(1,)](
            hidden, unused if delta is None else delta, unused if out is None else out, state,
            unused if adapted is None else adapted, unused if stash is None else stash, exited, layer,
            unused if ended is None else ended, unused if flags is None else flags,
            unused if weight is None else weight, unused if offset is None else offset, at, limit,
            unused if pending is None else pending, rows, width, HAS_DELTA=delta is not None,
            HAS_PENDING=pending is not None, HAS_OUT=out is not None, HAS_ADAPTED=adapted is not None,
            HAS_STASH=stash is not None, HAS_FLAGS=flags is not None, FINAL=final, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=4 if block_r * block_d <= 2048 else 8)

    return run


def fused_wait(waiting, waiting_cos, waiting_sin, waiting_slot, waiting_from, pending, state, cos, sin, slot, step, at,
               defer: int) -> None:
    """:func:`~earlyexit.engine.dynamic.wait` (same arguments, the same buffers written) as one kernel; every buffer
    contiguous, as the skipping program allocates them."""
    rows, width, dim = state.shape[0], state.shape[-1], cos.shape[-1]
    block_d = _pow2(width)
    _kernel("wait_kernel")[(1,)](
        waiting, waiting_cos, waiting_sin, waiting_slot, waiting_from, pending, state, cos, sin, slot, step, at, rows,
        width, dim, defer, BLOCK_R=max(1, min(TILE // block_d, _pow2(rows))), BLOCK_D=block_d, BLOCK_H=_pow2(dim),
        num_warps=4 if block_d <= 2048 else 8)


def fused_advance(out: torch.Tensor, layers: torch.Tensor, step: torch.Tensor, slot: torch.Tensor, token: torch.Tensor,
                  layer: torch.Tensor, ended: torch.Tensor, ends: torch.Tensor | None) -> None:
    """``Columns.advance(token, layer)`` on a loop whose ``out`` and one extra, ``layers``, are ``[R, T]``, then
    ``ended |= isin(token, ends)``, as one kernel."""
    rows, columns = out.shape
    _kernel("advance_kernel")[(1,)](out, layers, step, slot, token, layer, ended, ended if ends is None else ends, rows,
                                    columns, 0 if ends is None else ends.numel(), BLOCK_R=_pow2(rows), num_warps=1)
