"""CALM's learned confidence: a linear probe per check layer that predicts, from the raw block output alone, whether
the exit's greedy token equals the last layer's.

The head-based measures (``softmax``, ``margin``) read the exit's full-vocabulary head at every check layer, and through
a shared exit block (exit adapters of kind ``block``) they first run that block: about two layers' work per check.
A probe is one dot product of the RMS-normalised exit state: the dynamic exit (``generation.measure learned``,
:mod:`earlyexit.engine.dynamic`) then runs the shared block and the head only where a token does exit.

A probe is fitted once per model and adapter (``scripts/fit_probe.py``) on teacher-forced training answers: at
every answer position and check layer L the label is whether exit L's greedy token equals the last layer's, the
token a dynamic exit at L keeps or changes. Logistic regression, full batch (L-BFGS), one probe per layer. Its
output is that probability, so a threshold reads as the agreement a token needs to exit. Saved in a directory as
``exit_probe.safetensors`` + ``exit_probe.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from earlyexit.errors import EarlyExitError
from earlyexit.tokens import IGNORE_INDEX, pad

WEIGHTS, CONFIG = "exit_probe.safetensors", "exit_probe.json"


def features(hidden: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` raw block output → float32, scaled to unit root mean square (the residual stream grows with
    depth; the probe reads its direction)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ExitProbe(nn.Module):
    """One logistic probe per check layer: ``P(exit L's token == the last layer's) = σ(w_L · features(h_L) + b_L)``.

    Args:
        layers: the check layers it serves.
        hidden_size: D.
    """

    def __init__(self, layers: list[int], hidden_size: int):
        super().__init__()
        self.layers, self.hidden_size = sorted(set(layers)), hidden_size
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.weight = nn.Parameter(torch.zeros(len(self.layers), hidden_size))
        self.bias = nn.Parameter(torch.zeros(len(self.layers)))

    def logit(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        i = self.index[layer]
        return features(hidden) @ self.weight[i] + self.bias[i]

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``[..., D]`` raw output of block ``layer`` → ``[...]`` the probability that its exit agrees with the last layer."""
        return torch.sigmoid(self.logit(hidden, layer))

    def require(self, layers: list[int], where: str) -> None:
        """Refuse check layers the probe was not fitted at."""
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise EarlyExitError(f"the exit probe {where} was fitted at layers {self.layers}, not at check layers {missing}: "
                                 "refit it (scripts/fit_probe.py --layers ...) or set generation.check_layers")

    def save(self, directory: str | Path, about: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().float().cpu().contiguous(), "bias": self.bias.detach().float().cpu().contiguous()},
                  str(directory / WEIGHTS))
        config = {"layers": self.layers, "hidden_size": self.hidden_size, **({"about": about} if about else {})}
        (directory / CONFIG).write_text(json.dumps(config, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int | None = None) -> ExitProbe:
        """The probe saved in ``directory``; ``hidden_size``: the model's, checked."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
            raise EarlyExitError(f"no exit probe in {directory} (expected {CONFIG} and {WEIGHTS}): fit one with "
                                 "scripts/fit_probe.py")
        config = json.loads((directory / CONFIG).read_text())
        if hidden_size is not None and config["hidden_size"] != hidden_size:
            raise EarlyExitError(f"the exit probe in {directory} reads states of size {config['hidden_size']}; this "
                                 f"model's are {hidden_size}")
        from earlyexit.provenance import check_weights

        check_weights(directory / WEIGHTS, "exit probe")
        probe = cls(config["layers"], config["hidden_size"])
        try:
            probe.load_state_dict(load_file(str(directory / WEIGHTS)))
        except (RuntimeError, KeyError) as err:
            raise EarlyExitError(f"the exit probe in {directory} does not match its {CONFIG} ({type(err).__name__})") from None
        return probe.requires_grad_(False)


@torch.no_grad()
def collect(ee, examples: list[dict], layers: list[int], batch_size: int,
            pad_id: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher-forced probe data: ``{layer: (features [M, D], agrees [M], top [M])}`` over every answer position of
    ``examples`` (tokenized with ``input_ids`` and ``labels``), on the CPU. ``agrees``: exit ``layer``'s greedy token
    (through its adapter or the shared exit block) equals the last layer's; ``top``: that exit's top probability
    (the ``softmax`` measure, for comparison)."""
    device = next(ee.parameters()).device
    n = ee.n_layers
    adapters = ee.adapters
    out: dict[int, tuple[list, list, list]] = {layer: ([], [], []) for layer in layers}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        input_ids = pad([e["input_ids"] for e in chunk], pad_id, "right").to(device)
        mask = pad([[1] * len(e["input_ids"]) for e in chunk], 0, "right").to(device)
        keep = pad([e["labels"] for e in chunk], IGNORE_INDEX, "right").to(device)[:, 1:] != IGNORE_INDEX
        raw = ee.hidden_states(input_ids, mask, exit_layers=[*layers, n], raw=True)
        through_block = adapters is not None and any(adapters.has_block(layer) for layer in layers)
        read = ee.hidden_states(input_ids, mask, exit_layers=layers) if through_block else raw
        final = ee.exit_logits(raw[n][:, :-1][keep]).argmax(-1)
        for layer in layers:
            top, token = ee.exit_logits(read[layer][:, :-1][keep], layer).float().softmax(-1).max(-1)
            out[layer][0].append(features(raw[layer][:, :-1][keep]).cpu())
            out[layer][1].append((token == final).cpu())
            out[layer][2].append(top.cpu())
    return {layer: tuple(torch.cat(parts) for parts in lists) for layer, lists in out.items()}


@torch.enable_grad()
def fit(data: dict[int, tuple[torch.Tensor, ...]], l2: float = 1e-4, steps: int = 100) -> ExitProbe:
    """Logistic regression per layer on :func:`collect`'s features and labels (full batch, L-BFGS, ``l2`` on the
    weights)."""
    layers = sorted(data)
    hidden_size = data[layers[0]][0].shape[1]
    probe = ExitProbe(layers, hidden_size)
    for i, layer in enumerate(layers):
        x, y = data[layer][0], data[layer][1].float()
        if not len(y):
            raise EarlyExitError("no answer positions to fit the exit probe on")
        w = torch.zeros(hidden_size, requires_grad=True)
        rate = y.mean().clamp(1e-4, 1 - 1e-4)
        b = torch.log(rate / (1 - rate)).reshape(1).requires_grad_(True)  # the base rate first
        optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def loss():
            optimiser.zero_grad()
            value = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
            value.backward()
            return value

        optimiser.step(loss)
        probe.weight.data[i], probe.bias.data[i] = w.detach(), b.detach()[0]
    return probe.requires_grad_(False)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (ties counted half): the chance a random agreeing position outscores a random other."""
    labels = labels.bool()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    order = scores.argsort()
    unique, inverse, counts = torch.unique(scores[order], return_inverse=True, return_counts=True)
    positions = torch.arange(1, len(scores) + 1, dtype=torch.float)
    mean_rank = torch.zeros(len(unique)).index_add_(0, inverse, positions) / counts  # tied scores share their ranks
    ranks = torch.empty(len(scores))
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def forced_probe(layers: list[int], hidden_size: int, sure_from: int | None, directory: str | Path) -> str:
    """Save a probe that says yes at every check layer from ``sure_from`` on and no below it (None: never), whatever
    the state: a dynamic exit that exits every token at ``sure_from`` (benchmarks and profiles force exits with it).
    Returns the directory, as ``generation.probe`` takes it."""
    probe = ExitProbe(layers, hidden_size)
    probe.bias.data = torch.tensor([50.0 if sure_from is not None and layer >= sure_from else -50.0 for layer in probe.layers])
    probe.save(directory)
    return str(directory)
