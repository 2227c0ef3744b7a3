"""Exit adapters: a small trainable map per exit in front of the model's shared final norm and head.

Exit layer L's logits become ``head(norm(h + A_L h + b_L))`` instead of ``head(norm(h))``: the tuned lens's
affine translators (Belrose et al., 2023) used as part of the model, so an exit can answer without moving the
trunk or the shared head. ``A_L`` is a full ``D × D`` matrix or, with ``rank``, a low-rank product. The ``mlp``
kind is a residual two-layer perceptron per exit instead, ``h + W2 silu(W1 LayerNorm(h))`` (a block's MLP without
attention: position-wise, so it needs no KV cache). The ``block`` kind is one extra decoder block shared by every
exit (Kangaroo, Liu et al., 2024): a copy of the model's last block that reads exit L's states of the whole sequence
with causal attention, so an exit can gather context that its own layer does not yet hold; it runs as a block after
block L (the model's own forward, KV cache and ``generate`` see blocks 1..L and it; the engine's fixed exits give it
a cache layer per exit in every mode, on its fast path), and on training sequences through
:meth:`earlyexit.model.EarlyExitHead.hidden_states`. Every map's output layer starts at zero (the block's
attention output and MLP down projections too), so an untrained adapter is the identity and exit L starts as the
logit lens. The last layer has no adapter: it stays the model's own output.

The adapters live on the model (``model.exit_adapters``), so :class:`earlyexit.model.EarlyExitHead` and every
decode path built on it (evaluate, the engine's all-exits / dynamic / speculative modes, serve, lens) apply them,
and they are saved beside a LoRA adapter as ``exit_adapters.safetensors`` + ``exit_adapters.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit.errors import EarlyExitError

WEIGHTS, CONFIG = "exit_adapters.safetensors", "exit_adapters.json"


Kind = Literal["affine", "mlp", "block"]


class _Perceptron(nn.Module):
    """``W2 silu(W1 LayerNorm(h))``, W2 zero-initialised (the adapter's residual branch)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, width), nn.Linear(width, d)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(self.norm(hidden))))


class ExitAdapters(nn.Module):
    """One zero-initialised map per exit layer: ``h + A_L h + b_L`` (affine) or ``h + W2 silu(W1 LN(h))`` (mlp); or
    one decoder block shared by the exits (block).

    Args:
        layers: the exits that get an adapter (the last layer never does).
        hidden_size: D.
        rank: affine: None for full ``D × D`` maps, r for ``B_L (C_L h)`` with ``C_L: D → r``, ``B_L: r → D`` (B starts
            at 0); mlp: the hidden width (4·D when None); block: unused.
        kind: affine, mlp or block.
        template: block: a copy of the model's last decoder block (:func:`block_template`), taken over here (its
            output projections zeroed).
    """

    def __init__(self, layers: list[int], hidden_size: int, rank: int | None = None, kind: Kind = "affine",
                 template: nn.Module | None = None):
        super().__init__()
        if kind not in ("affine", "mlp", "block"):
            raise EarlyExitError(f"exit adapter kind {kind!r}: affine, mlp or block")
        self.layers, self.hidden_size, self.rank, self.kind = sorted(set(layers)), hidden_size, rank, kind
        self.maps = nn.ModuleDict({} if kind == "block" else {str(l): self._map(hidden_size, rank, kind) for l in self.layers})
        self.block = None
        if kind == "block":
            if template is None:
                raise EarlyExitError("exit adapters of kind block copy the model's last block: none was given")
            self.block = template  # a copy of the model's last block (block_template), owned from here on
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                out = self.block.get_submodule(name)
                nn.init.zeros_(out.weight)
                if out.bias is not None:
                    nn.init.zeros_(out.bias)
            self.block.requires_grad_(True)

    def has_map(self, layer: int) -> bool:
        """Whether exit ``layer`` has a map of its own (affine or mlp) applied to each token's state."""
        return str(layer) in self.maps

    def has_block(self, layer: int) -> bool:
        """Whether exit ``layer`` reads through the shared block (applied to whole sequences, not per token)."""
        return self.block is not None and layer in self.layers

    def run_block(self, hidden: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """The shared block on ``hidden`` ``[B, T, D]`` (an exit's states) with the keyword arguments the model passes
        its blocks (masks, rotary tables, positions; no cache), in the adapter's dtype."""
        dtype = next(self.block.parameters()).dtype
        cast = {name: cast_floats(value, dtype) for name, value in block_kwargs.items()}
        out = self.block(hidden.to(dtype), **cast)
        return (out[0] if isinstance(out, tuple) else out).to(hidden.dtype)

    @staticmethod
    def _map(d: int, rank: int | None, kind: Kind) -> nn.Module:
        if kind == "mlp":
            return _Perceptron(d, rank or 4 * d)
        if rank is None:
            linear = nn.Linear(d, d)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            return linear
        down, up = nn.Linear(d, rank, bias=False), nn.Linear(rank, d)
        nn.init.normal_(down.weight, std=d**-0.5)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        return nn.Sequential(down, up)

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden: [..., D] raw output of block ``layer`` → the same, adapted (unchanged without an adapter, and for the
        block kind, which :meth:`run_block` applies to whole sequences)."""
        key = str(layer)
        if key not in self.maps:
            return hidden
        adapter = self.maps[key]
        weight = next(p for p in adapter.parameters() if p.dim() == 2)
        return hidden + adapter(hidden.to(weight.dtype)).to(hidden.dtype)

    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``exit_adapters.safetensors`` and ``exit_adapters.json``; ``state``: the weights to write (a gathered
        copy under FSDP), else this module's own."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = state or self.state_dict()
        save_file({k: v.detach().cpu().clone() for k, v in weights.items()}, directory / WEIGHTS)  # own storage each
        (directory / CONFIG).write_text(json.dumps({"layers": self.layers, "hidden_size": self.hidden_size,
                                                    "rank": self.rank, "kind": self.kind}) + "\n")

    @classmethod
    def load(cls, directory: str | Path, template: nn.Module | None = None) -> ExitAdapters | None:
        """The adapters saved in ``directory``, or None when it holds none; ``template``: the model's last block (for
        the block kind)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG).is_file():
            return None
        try:
            config = json.loads((directory / CONFIG).read_text())
            adapters = cls(config["layers"], config["hidden_size"], config.get("rank"), config.get("kind", "affine"), template)
            adapters.load_state_dict(load_file(directory / WEIGHTS))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise EarlyExitError(f"{directory}: cannot load the exit adapters ({type(err).__name__}: {err})") from None
        return adapters


def shared_block(directory: str | Path) -> bool:
    """Whether ``directory`` holds exit adapters of the block kind (they need :func:`block_template`); False where it
    holds none."""
    if not (Path(directory) / CONFIG).is_file():
        return False
    try:
        return json.loads((Path(directory) / CONFIG).read_text()).get("kind") == "block"
    except (OSError, ValueError) as err:
        raise EarlyExitError(f"{directory}: cannot read {CONFIG} ({type(err).__name__}: {err})") from None


def block_template(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s last decoder block, taken before any LoRA wrapping: what a ``block`` exit adapter starts
    from. Where blocks differ in their attention window (Gemma 2 and 3: sliding and global), it is of the last block's
    type and reads every exit with that type's mask and rotary table (:meth:`earlyexit.model.EarlyExitHead.running`).
    Refused for blocks without llama-style output projections."""
    from earlyexit.arch import get_submodule, spec_for

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    block = get_submodule(base, spec_for(config.model_type).layers)[-1]
    if any(hasattr(m, "lora_A") for m in block.modules()):
        raise EarlyExitError("exit adapters of kind block are copied from the model before its LoRA adapters")
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        try:
            block.get_submodule(name)
        except AttributeError:
            raise EarlyExitError(f"exit adapters of kind block: {config.model_type}'s blocks have no {name}; use "
                                 "kind affine or mlp") from None
    return copy.deepcopy(block)


def cast_floats(value, dtype: torch.dtype):
    """Floating tensors (nested in tuples) in ``dtype``; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(cast_floats(item, dtype) for item in value)
    return value


def attach(model: nn.Module, adapters: ExitAdapters | None) -> None:
    """Make ``adapters`` part of ``model`` (the ``*ForCausalLM``, peft's base model when wrapped), on its device and
    in float32 (small, and trained in full precision)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if adapters is None:
        return
    if adapters.hidden_size != base.config.hidden_size:
        raise EarlyExitError(f"exit adapters of width {adapters.hidden_size} do not fit a model of width {base.config.hidden_size}")
    base.exit_adapters = adapters.to(next(base.parameters()).device, torch.float32)


def attached(model: nn.Module) -> ExitAdapters | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "exit_adapters", None)
