"""The architecture table: where each decoder family keeps its blocks, final norm and output head.

This is the only place in earlyexit that knows about model families. Everything else asks
:func:`spec_for` and walks the dotted paths it returns, so adding a family is one row here
(plus a tiny config in ``tests/conftest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earlyexit.errors import EarlyExitError

_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """Where the exit-relevant parts of one decoder family live.

    Paths are dotted attribute paths from the ``*ForCausalLM`` module (the peft base model when wrapped).
    """

    layers: str
    """The ``nn.ModuleList`` of decoder blocks."""
    norm: str
    """The final norm applied after the last block."""
    head: str
    """The output projection to the vocabulary."""
    lora_targets: tuple[str, ...]
    """Names of the linear layers LoRA adapts by default (all linear layers of attention and MLP)."""
    softcap_attr: str | None = None
    """Config attribute holding a final-logit soft-capping value (``tanh(x / c) * c``), if the family has one."""
    rotary_by_layer_type: bool = False
    """Whether the decoder computes one rotary table per layer type (Gemma 3: local and global bases) and hands each
    block its type's, so the engine must too."""
    fast_block: bool = False
    """Whether the blocks are llama-style (RMSNorm, rotary attention with q/k/v/o projections, SwiGLU ``gate/up/down``
    MLP), so that the engine's fast path (:mod:`earlyexit.engine.fast`) can run them."""


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA, fast_block=True),
    "mistral": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA, fast_block=True),
    "qwen2": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA, fast_block=True),
    "gemma": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA),
    "gemma2": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA, softcap_attr="final_logit_softcapping"),
    "gemma3_text": ArchSpec("model.layers", "model.norm", "lm_head", _LLAMA_LORA, softcap_attr="final_logit_softcapping",
                            rotary_by_layer_type=True),
    "phi": ArchSpec("model.layers", "model.final_layernorm", "lm_head", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "phi3": ArchSpec("model.layers", "model.norm", "lm_head", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", ("c_attn", "c_proj", "c_fc")),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "lm_head",
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
}


CACHE_ARGS = ("cache", "past_key_values", "layer_past")
"""The keyword a decoder block takes its KV cache by, across families and transformers versions (first found wins)."""

UNBATCHED_ARGS = ("cache_position",)
"""Block keyword arguments whose leading dimension is not the batch, even when its size equals the batch's."""


def sliding_windows(config) -> list[int | None]:
    """Each block's sliding attention window (None: full attention), as the family's own masks apply it:
    per-layer ``layer_types`` (Gemma-2, Qwen2), else one ``sliding_window`` for all blocks (Mistral) unless
    ``use_sliding_window`` is off."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types[:n]]
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        return [window] * n
    return [None] * n


def spec_for(model_type: str) -> ArchSpec:
    """Return the table row for ``config.model_type``; an unknown family names the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise EarlyExitError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path == "a.b.c"``."""
    module = root
    for name in path.split("."):
        if name not in module._modules:
            raise EarlyExitError(f"{type(root).__name__} has no submodule {path!r}; the architecture table is out of date")
        module = module._modules[name]
    return module


def set_submodule(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the module at ``path`` (used to swap in a shortened block list)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def fast_path(config) -> bool:
    """Whether the engine's fast path runs this model's blocks: a llama-style family (:attr:`ArchSpec.fast_block`)
    with the SwiGLU MLP's own activation."""
    return spec_for(config.model_type).fast_block and getattr(config, "hidden_act", "silu") == "silu"


def off_fast_path(config, fast: bool | None = None) -> str | None:
    """Why the engine's fast path does not run (``generation.fast`` false, or the family's blocks), None where it does;
    ``config`` is not read when ``fast`` is false."""
    if fast is False:
        return "generation.fast false"
    return None if fast_path(config) else f"{config.model_type}'s blocks"


FAST_FAMILIES = ", ".join(sorted(t for t, s in ARCHITECTURES.items() if s.fast_block))
"""The families whose blocks the engine's fast path runs, for messages."""


def post_head(logits: torch.Tensor, config) -> torch.Tensor:
    """Apply the family's transform after the output head (Gemma-2 soft-capping); identity otherwise."""
    attr = spec_for(config.model_type).softcap_attr
    cap = getattr(config, attr, None) if attr else None
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
