"""Triton kernels of the decode step (imported only where Triton is: CUDA builds of torch bring it)."""

import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 ``x`` to ``dtype``, to nearest even; bfloat16 by its bits (Triton's interpreter truncates, the GPU does
    not: spelled out, both round alike)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def learned_check(h, delta, out, state, adapted, stash, exited, layer, ended, flags, weight, offset, at, limit, pending,
                  rows: tl.constexpr, width: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_PENDING: tl.constexpr,
                  HAS_OUT: tl.constexpr, HAS_ADAPTED: tl.constexpr, HAS_STASH: tl.constexpr, HAS_FLAGS: tl.constexpr,
                  FINAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`earlyexit.engine.dynamic.decide` (learned measure, or ``FINAL``) in one program: ``h``, ``delta``, ``out``,
    ``state``, ``adapted``, ``stash`` ``[rows, width]`` contiguous; ``exited``, ``layer``, ``ended`` ``[rows]``; ``flags``
    ``[2]``; ``weight`` ``[width]`` float32; ``offset``, ``at``, ``limit`` 0-d; ``pending`` ``[rows, width]`` (``delta``
    kept for the next blocks; ``out`` then gets ``h`` before the add). A buffer whose ``HAS_`` is off is never read or
    written."""
    cols = tl.arange(0, BLOCK_D)
    inside = cols < width
    if not FINAL:
        w = tl.load(weight + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(offset).to(tl.float32)
        threshold = tl.load(limit).to(tl.float32)
    here = tl.load(at)
    every = tl.full((), 1, tl.int32)
    some = tl.full((), 0, tl.int32)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        real = r < rows
        both = real[:, None] & inside[None, :]
        at_rd = r[:, None] * width + cols[None, :]
        raw = tl.load(h + at_rd, mask=both, other=0.0)
        x = raw
        if HAS_DELTA:  # the blocks' pending add, rounded to the hidden dtype as the eager add is
            add = tl.load(delta + at_rd, mask=both, other=0.0)
            x = _rounded(raw.to(tl.float32) + add.to(tl.float32), raw.dtype)
            if HAS_PENDING:  # kept apart for the next blocks, which add it themselves
                tl.store(pending + at_rd, add, mask=both)
        if HAS_OUT:
            if HAS_PENDING:
                tl.store(out + at_rd, raw, mask=both)
            else:
                tl.store(out + at_rd, x, mask=both)
        was = tl.load(exited + r, mask=real, other=1) != 0
        if FINAL:
            now = ~was & real
        else:  # features(x) · w + b, sigmoid, against the threshold
            xf = x.to(tl.float32)
            scale = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / width + 1e-6)
            logit = tl.sum(xf * scale[:, None] * w[None, :], axis=1) + b
            sure = 1.0 / (1.0 + tl.exp(-logit))
            now = ~was & (sure >= threshold) & real
        kept = tl.load(state + at_rd, mask=both, other=0.0)
        kept = tl.where(now[:, None], x, kept)
        tl.store(state + at_rd, kept, mask=both)
        if HAS_ADAPTED:
            tl.store(adapted + at_rd, x, mask=both & now[:, None])
        old = tl.load(layer + r, mask=real, other=0)
        tl.store(layer + r, tl.where(now, here, old), mask=real)
        gone = was | now
        tl.store(exited + r, gone, mask=real)
        if HAS_STASH:
            tl.store(stash + at_rd, tl.where(gone[:, None], kept, x), mask=both)
        if HAS_FLAGS:
            stop = tl.load(ended + r, mask=real, other=1) != 0
            every = every & tl.min(tl.where(real, (gone | stop).to(tl.int32), 1), axis=0)
            some = some | tl.max(tl.where(real, (now & ~stop).to(tl.int32), 0), axis=0)
    if HAS_FLAGS:
        tl.store(flags, every != 0)
        tl.store(flags + 1, some != 0)
