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


@triton.jit
def wait_kernel(waiting, waiting_cos, waiting_sin, waiting_slot, waiting_from, pending, state, cos, sin, slot, step, at,
                rows: tl.constexpr, width: tl.constexpr, dim: tl.constexpr, defer: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """:func:`earlyexit.engine.dynamic.wait` in one program: entry ``step % defer`` of ``waiting`` ``[rows, defer,
    width]``, ``waiting_cos``/``waiting_sin`` ``[rows, defer, dim]``, ``waiting_slot`` ``[rows, defer]`` and
    ``waiting_from`` ``[defer]`` gets ``state`` ``[rows, width]``, ``cos``/``sin`` ``[rows, dim]``, ``slot`` ``[rows]``
    and ``at``; ``pending`` becomes true."""
    i = tl.load(step) % defer
    cols = tl.arange(0, BLOCK_D)
    half = tl.arange(0, BLOCK_H)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        real = r < rows
        both = real[:, None] & (cols < width)[None, :]
        kept = tl.load(state + r[:, None] * width + cols[None, :], mask=both, other=0.0)
        tl.store(waiting + (r[:, None] * defer + i) * width + cols[None, :], kept, mask=both)
        rot = real[:, None] & (half < dim)[None, :]
        at_rh = r[:, None] * dim + half[None, :]
        into = (r[:, None] * defer + i) * dim + half[None, :]
        tl.store(waiting_cos + into, tl.load(cos + at_rh, mask=rot, other=0.0), mask=rot)
        tl.store(waiting_sin + into, tl.load(sin + at_rh, mask=rot, other=0.0), mask=rot)
        tl.store(waiting_slot + r * defer + i, tl.load(slot + r, mask=real, other=0), mask=real)
    tl.store(waiting_from + i, tl.load(at))
    tl.store(pending, True)


@triton.jit
def advance_kernel(out, layers, step, slot, token, layer, ended, ends, rows: tl.constexpr, columns: tl.constexpr,
                   n_ends: tl.constexpr, BLOCK_R: tl.constexpr):
    """A step's last bookkeeping in one program (:meth:`earlyexit.engine.core.Columns.advance` with one extra, and the
    ended rows): ``token`` and ``layer`` ``[rows]`` into column ``step + 1`` of ``out`` and ``layers`` ``[rows,
    columns]``; ``step`` ``[1]`` and ``slot`` ``[rows]`` one on; ``ended`` ``[rows]`` or-ed with ``token`` in ``ends``
    ``[n_ends]`` (none: ``n_ends`` 0)."""
    column = tl.load(step) + 1
    r = tl.arange(0, BLOCK_R)
    real = r < rows
    chosen = tl.load(token + r, mask=real, other=0)
    tl.store(out + r * columns + column, chosen, mask=real)
    tl.store(layers + r * columns + column, tl.load(layer + r, mask=real, other=0), mask=real)
    tl.store(slot + r, tl.load(slot + r, mask=real, other=0) + 1, mask=real)
    if n_ends > 0:
        hit = chosen < 0
        for e in tl.static_range(n_ends):
            hit = hit | (chosen == tl.load(ends + e))
        tl.store(ended + r, (tl.load(ended + r, mask=real, other=0) != 0) | hit, mask=real)
    tl.debug_barrier()  # every thread has read the step before it moves on
    tl.store(step, column)
