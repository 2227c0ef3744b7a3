"""Exit adapters: a small trainable map per exit in front of the model's shared final norm and head.

Exit layer L's logits become ``head(norm(h + A_L h + b_L))`` instead of ``head(norm(h))``: the tuned lens's
affine translators (Belrose et al., 2023) used as part of the model, so an exit can answer without moving the
trunk or the shared head. ``A_L`` is a full ``D × D`` matrix or, with ``rank``, a low-rank product. The ``mlp``
kind is a residual two-layer perceptron per exit instead, ``h + W2 silu(W1 LayerNorm(h))`` (a block's MLP without
attention: position-wise, so it needs no KV cache). Every map's output layer starts at zero, so an untrained
adapter is the identity and exit L starts as the logit lens. The last layer has no adapter: it stays the model's
own output.

The adapters live on the model (``model.exit_adapters``), so :class:`earlyexit.model.EarlyExitHead` and every
decode path built on it (evaluate, the engine's all-exits / dynamic / speculative modes, serve, lens) apply them,
and they are saved beside a LoRA adapter as ``exit_adapters.safetensors`` + ``exit_adapters.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit.errors import EarlyExitError

WEIGHTS, CONFIG = "exit_adapters.safetensors", "exit_adapters.json"


Kind = Literal["affine", "mlp"]


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
    """One zero-initialised map per exit layer: ``h + A_L h + b_L`` (affine) or ``h + W2 silu(W1 LN(h))`` (mlp).

    Args:
        layers: the exits that get an adapter (the last layer never does).
        hidden_size: D.
        rank: affine: None for full ``D × D`` maps, r for ``B_L (C_L h)`` with ``C_L: D → r``, ``B_L: r → D`` (B starts
            at 0); mlp: the hidden width (4·D when None).
        kind: affine or mlp.
    """

    def __init__(self, layers: list[int], hidden_size: int, rank: int | None = None, kind: Kind = "affine"):
        super().__init__()
        if kind not in ("affine", "mlp"):
            raise EarlyExitError(f"exit adapter kind {kind!r}: affine or mlp")
        self.layers, self.hidden_size, self.rank, self.kind = sorted(set(layers)), hidden_size, rank, kind
        self.maps = nn.ModuleDict({str(layer): self._map(hidden_size, rank, kind) for layer in self.layers})

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
        """hidden: [..., D] raw output of block ``layer`` → the same, adapted (unchanged without an adapter)."""
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
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / WEIGHTS)
        (directory / CONFIG).write_text(json.dumps({"layers": self.layers, "hidden_size": self.hidden_size,
                                                    "rank": self.rank, "kind": self.kind}) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ExitAdapters | None:
        """The adapters saved in ``directory``, or None when it holds none."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG).is_file():
            return None
        try:
            config = json.loads((directory / CONFIG).read_text())
            adapters = cls(config["layers"], config["hidden_size"], config.get("rank"), config.get("kind", "affine"))
            adapters.load_state_dict(load_file(directory / WEIGHTS))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise EarlyExitError(f"{directory}: cannot load the exit adapters ({type(err).__name__}: {err})") from None
        return adapters


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
