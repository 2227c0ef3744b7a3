"""A fast path for llama-style decoder blocks: fused projections, our own RMSNorm, RoPE and SDPA attention.

A llama-style block (Llama, Mistral, Qwen2: pre-norm RMSNorm, rotary attention with grouped KV heads, a SwiGLU
MLP) issues about 40 small kernels in its family's own code. Here the same maths runs as 4 matrix products (one
``qkv``, one ``o``, one ``gate|up``, one ``down``) plus a few element-wise operations that ``torch.compile`` fuses,
and attention reads the engine's static cache through ``scaled_dot_product_attention`` with our additive mask.

The fused weights are the model's own: the q/k/v (and gate/up) weights are copied once into one tensor and the
model's ``nn.Linear`` weights become views of it, so no weight is held twice and the model's own forward (the
generic path, HF ``generate``) keeps working on the same numbers. LoRA adapters are merged into the weights first
(peft ``merge_adapter``; ``unmerge_adapter`` restores them). The architecture table says which families take this
path (:attr:`earlyexit.arch.ArchSpec.fast_block`); the others keep the generic path.

Since the q/k/v (and gate/up) weights then share one storage, a model that will be saved with ``save_pretrained``
after decoding should be saved from a fresh load (or with ``fast=False`` engines): safetensors refuses shared memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit.arch import fast_path
from earlyexit.engine.cache import write
from earlyexit.errors import EarlyExitError


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in float32, cast back, then scale (the order matters in bf16)."""
    x = hidden.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (the rotate-half convention). x: [R, heads, q, d]; cos, sin: [R, 1, q, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` holding the weights (under a peft LoRA layer, its base layer)."""
    return getattr(module, "base_layer", module)


def _plain(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _fuse(linears: list[nn.Linear], out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; each ``nn.Linear`` then views its rows.
    ``out``: where the fused weight goes (a slice of the stacked weights of every block), else a new tensor."""
    weight = torch.cat([lin.weight.detach() for lin in linears], out=out)
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])
    start = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight.data = weight[start : start + rows]
        if lin.bias is not None:
            lin.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def block_forward(residual: torch.Tensor, delta: torch.Tensor | None, mask: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, ln1, wqkv, bqkv, wo, bo,
                  ln2, wgu, bgu, wdown, bdown, heads: int, kv_heads: int, head_dim: int, scaling: float, eps1: float,
                  eps2: float, inter: int, hold: torch.Tensor | None = None, state: torch.Tensor | None = None):
    """One llama-style block as a pure function of tensors (and the block shape's numbers, the same for every block), so
    that one compiled version serves every block, every exit and every setting of a process.

    The block's input is ``residual + delta`` (``delta`` None: 0); it returns its output as ``(residual, delta)``, the
    last residual add left to the next block, where it fuses with that block's norm. ``hold`` ``[R]`` bool: rows
    whose input is ``state`` ``[R, q, D]`` instead (a dynamic exit's rows that have exited, riding along with their exit
    state). The new keys and values are written into ``keys``/``values`` ``[R, k, S, d]`` at ``slots`` ``[R, q]``.

    Shapes: residual, delta ``[R, q, D]``; mask ``[R, 1, q, S]`` additive; cos, sin ``[R, q, d]``.
    """
    hidden = residual if delta is None else residual + delta
    if hold is not None:
        hidden = torch.where(hold[:, None, None], state, hidden)
    rows, q, _ = hidden.shape
    h, k, d = heads, kv_heads, head_dim
    x = rms_norm(hidden, ln1, eps1)
    qkv = F.linear(x, wqkv, bqkv)  # [R, q, (h + 2k) d]
    query, key, value = qkv.split([h * d, k * d, k * d], dim=-1)
    query = query.view(rows, q, h, d).transpose(1, 2)  # [R, h, q, d]
    key = key.view(rows, q, k, d).transpose(1, 2)
    value = value.view(rows, q, k, d).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = rotate(query, cos, sin), rotate(key, cos, sin)
    write(keys, values, key, value, slots)
    attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=h != k)
    hidden = hidden + F.linear(attn.transpose(1, 2).reshape(rows, q, h * d), wo, bo)
    x = rms_norm(hidden, ln2, eps2)
    gate, up = F.linear(x, wgu, bgu).split([inter, inter], dim=-1)
    return hidden, F.linear(F.silu(gate) * up, wdown, bdown)


def kv_forward(hidden: torch.Tensor, norms: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
               sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, eps: float, kv_heads: int,
               head_dim: int) -> None:
    """The keys and values L blocks compute for their inputs, written to their cache layers, and nothing else: a dynamic
    exit's state propagated to the blocks it skips (CALM), one batched product for all of them; in the weights' dtype.

    Shapes: hidden ``[L or 1, R, q, D]`` (each block's input, or one for all); norms ``[L or 1, D]`` (their input norms'
    weights); weight ``[L or 1, 2 k d, D]`` (their k|v rows, or one block's for all: the shared exit block, read once);
    bias ``[L or 1, 2 k d]``; cos, sin ``[R, q, d]``; keys, values ``[L, R, k, S, d]`` (their cache layers); slots
    ``[R, q]`` or ``[L, R, q]``.
    """
    count, (_, rows, q, width), k, d = keys.shape[0], hidden.shape, kv_heads, head_dim
    dtype = weight.dtype
    x = hidden.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)  # as rms_norm, in the block's dtype
    x = norms[:, None] * normed.reshape(-1, rows * q, width)  # [L or 1, R q, D]
    if weight.shape[0] == 1:  # one weight for every input: a single product reads it once
        kv = (x.reshape(-1, width) @ weight[0].t()).view(x.shape[0], rows * q, -1)
    else:
        kv = torch.matmul(x, weight.transpose(1, 2))  # [L, R q, 2 k d]
    if bias is not None:
        kv = kv + bias[:, None]
    kv = kv.expand(count, -1, -1).reshape(count, rows, q, 2 * k, d).transpose(2, 3)  # [L, R, 2k, q, d]
    cos, sin = cos[None, :, None].to(dtype), sin[None, :, None].to(dtype)  # [1, R, 1, q, d]
    write(keys, values, rotate(kv[:, :, :k], cos, sin), kv[:, :, k:], slots)


class FusedBlock:
    """One llama-style block on fused weights. ``__call__`` equals the block's own forward; :meth:`pair` is the same
    through :func:`block_forward` (``run``: it, or its compiled version)."""

    def __init__(self, block: nn.Module, config, qkv: torch.Tensor | None = None):
        attn, mlp = block.self_attn, block.mlp
        self.layer_idx = attn.layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        # every weight detached (a view: the model's own storage), so one compiled block serves trunk and exit blocks
        self.ln1, self.eps1 = _plain(block.input_layernorm.weight), block.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = _plain(block.post_attention_layernorm.weight), block.post_attention_layernorm.variance_epsilon
        self.wqkv, self.bqkv = _fuse([_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)], qkv)
        self.wo, self.bo = _plain(_linear(attn.o_proj).weight), _plain(_linear(attn.o_proj).bias)
        self.wgu, self.bgu = _fuse([_linear(mlp.gate_proj), _linear(mlp.up_proj)])
        self.wdown, self.bdown = _plain(_linear(mlp.down_proj).weight), _plain(_linear(mlp.down_proj).bias)
        self.inter = _linear(mlp.gate_proj).out_features
        self.dtype = self.wqkv.dtype

    def pair(self, residual: torch.Tensor, delta: torch.Tensor | None, mask: torch.Tensor, position_embeddings, cache,
             hold: tuple[torch.Tensor, torch.Tensor] | None = None, run=block_forward):
        """:func:`block_forward` on this block's weights, writing its cache layer of ``cache`` (a
        :class:`~earlyexit.engine.cache.StaticKV` whose ``slots`` are set); ``hold``: ``(rows, state)`` or None."""
        rows, q, _ = residual.shape
        keys, values = cache.layer(self.layer_idx, rows, self.kv_heads, self.head_dim, residual.dtype, residual.device)
        cos, sin = position_embeddings
        held, state = hold if hold is not None else (None, None)
        return run(residual, delta, mask, cos, sin, keys, values, cache.slots, self.ln1, self.wqkv, self.bqkv, self.wo,
                   self.bo, self.ln2, self.wgu, self.bgu, self.wdown, self.bdown, self.heads, self.kv_heads, self.head_dim,
                   self.scaling, self.eps1, self.eps2, self.inter, held, state)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, position_embeddings, cache, run=block_forward) -> torch.Tensor:
        """hidden: [R, q, D]; mask: [R, 1, q, S] additive; position_embeddings: (cos, sin) [R, q, d]; cache: StaticKV."""
        residual, delta = self.pair(hidden, None, mask, position_embeddings, cache, run=run)
        return residual + delta

    def kv_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The k|v rows of the fused q|k|v weight (and bias): what :func:`kv_forward` reads."""
        start = self.heads * self.head_dim
        return self.wqkv[start:], None if self.bqkv is None else self.bqkv[start:]


class KVFill:
    """The keys and values of consecutive blocks for one input state, computed together: a dynamic exit's state is the
    input of every block it skips (CALM's state propagation), so their K/V projections are one batched product over
    the stacked k|v rows of the blocks' fused weights (views, no copy) and one cache write (:func:`kv_forward`),
    instead of a norm, a product, a rotation and two writes per block."""

    def __init__(self, blocks: list[FusedBlock], qkv: torch.Tensor, bias: torch.Tensor | None):
        first = blocks[0]
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim
        if {block.eps1 for block in blocks} != {first.eps1}:
            raise EarlyExitError("the fast path needs one RMSNorm epsilon for every block")
        self.eps = first.eps1
        start = first.heads * first.head_dim
        self.weight = qkv[:, start:]  # [n, 2 k d, D]: the k|v rows of every block
        self.bias = None if bias is None else bias[:, start:]
        self.norms = torch.stack([block.ln1.detach() for block in blocks])  # [n, D]

    def __call__(self, hidden: torch.Tensor, position_embeddings, cache, first: int, last: int, run=kv_forward,
                 slots: torch.Tensor | None = None) -> None:
        """Write blocks ``first``..``last``'s (1-based) keys and values for input ``hidden`` ``[R, q, D]`` into ``cache``
        (its stacked buffers, :meth:`~earlyexit.engine.cache.StaticKV.stack`) at ``slots`` (``[R, q]``, or
        ``[last - first + 1, R, q]``: each block its own; default: the cache's)."""
        keys, values = cache.stacked(first - 1, last)
        cos, sin = position_embeddings
        run(hidden[None], self.norms[first - 1 : last], self.weight[first - 1 : last],
            None if self.bias is None else self.bias[first - 1 : last], cos, sin, keys, values,
            cache.slots if slots is None else slots, self.eps, self.kv_heads, self.head_dim)


def fast_inputs(decoder: nn.Module, ids: torch.Tensor, positions: torch.Tensor):
    """The block inputs of a llama-style decoder: its own token embedding and rotary tables (cos, sin) at ``positions``."""
    hidden = decoder.embed_tokens(ids)
    return hidden, decoder.rotary_emb(hidden, position_ids=positions)


def fast_blocks(ee) -> tuple[list[FusedBlock], KVFill] | None:
    """The fused blocks of ``ee``'s model and their stacked K/V fill when its family takes the fast path (else
    None); merges LoRA adapters. Every block's fused q|k|v weight is one slice of a stacked ``[n, (h + 2k) d, D]``
    tensor, so :class:`KVFill` reads them all without a copy (while it is built, the model's q/k/v weights are held
    twice: 3.2 GB more for a moment at Llama-2-7B's size in bf16)."""
    if not fast_path(ee.config):
        return None
    lm = ee.lm
    if hasattr(lm, "merge_adapter") and any(hasattr(m, "lora_A") for m in lm.modules()):
        lm.merge_adapter()  # the fused weights must hold the adapted weights
    projections = [_linear(getattr(ee.blocks[0].self_attn, name)) for name in ("q_proj", "k_proj", "v_proj")]
    first = projections[0].weight
    qkv = first.new_empty(len(ee.blocks), sum(p.out_features for p in projections), first.shape[1])
    blocks = [FusedBlock(block, ee.config, qkv[i]) for i, block in enumerate(ee.blocks)]
    for block in blocks:
        if block.heads % block.kv_heads:
            raise EarlyExitError(f"{ee.config.model_type}: {block.heads} heads do not group over {block.kv_heads} KV heads")
    bias = None if blocks[0].bqkv is None else torch.stack([block.bqkv for block in blocks])
    return blocks, KVFill(blocks, qkv, bias)
