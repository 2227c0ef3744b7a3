"""Decoding options and the sampling rule, defined once for every decode path and command.

:class:`GenerationArgs` is the one set of options: ``evaluate``, ``judge``, ``bench``, the scripts, the server's
requests (mapped onto it), :meth:`earlyexit.model.EarlyExitHead.generate` and every mode of
:class:`earlyexit.engine.Engine` read their defaults and checks from it. :func:`select` is the one token choice
(greedy, or temperature / nucleus sampling) that the engine's programs call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch

from earlyexit.context import Context
from earlyexit.errors import EarlyExitError, in_unit, non_negative, positive, require

Measure = Literal["softmax", "margin", "state", "learned"]
ExitMode = Literal["fixed", "dynamic"]
Decide = Literal["auto", "device", "host"]
Schedule = Literal["auto", "all"]


@dataclass(frozen=True)
class GenerationArgs:
    """How each exit decodes.

    Args:
        max_new_tokens: Length limit of each answer, in tokens.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (sampling only; > 0).
        top_p: Nucleus sampling mass, in (0, 1] (sampling only).
        seed: Seed of sampling; each example derives its own (:func:`example_seed`), so resumed runs sample the same.
        engine: decode all exits of a batch in one batched pass with :class:`earlyexit.engine.Engine` (CUDA graphs
            on a GPU); False runs the model's own ``generate`` once per exit (the reference path).
        compile: with the engine, compile its decode step (``torch.compile``; pays off on long runs of one shape).
        compile_mode: ``torch.compile``'s mode: ``auto`` (``gemv`` for models of hidden size below 2,048, else
            ``default``), ``gemv`` (as ``default``, and on a GPU a one-row matrix product, batch 1's, becomes a
            reduction fused with the norm before it and the residual after it, in Triton kernels tuned by coordinate
            descent: gpt-fast's setting; it pays where the products are small and launch-bound, and loses to cuBLAS
            on large ones), ``default``, or ``max-autotune-no-cudagraphs`` (searches kernels for each matrix shape at
            the first call; minutes).
        fast: with the engine, run llama-style blocks on its fast path (fused projections, SDPA on the static cache;
            LoRA adapters merged first); None: whenever the family has one; False: the model's own blocks.
        exit: ``fixed``: every exit layer answers; ``dynamic``: one answer per example, each token exiting at the
            first layer ≥ ``min_layer`` whose confidence reaches ``threshold`` (CALM), reported as layer N with
            the mean layers used.
        threshold: dynamic exit confidence threshold (0 exits at ``min_layer``; above 1 never exits early).
        min_layer: dynamic exit's lowest exit; :func:`default_min_layer` (N/4) when None.
        measure: dynamic exit confidence: ``softmax`` (top probability), ``margin`` (top-1 − top-2), ``state``
            (cosine of consecutive hidden states) or ``learned`` (CALM's classifier: ``probe``'s estimate that the
            exit's token is the last layer's; no head and no shared exit block until a token exits).
        probe: the exit probe ``learned`` reads (a directory written by ``scripts/fit_probe.py``).
        check_every: dynamic exit: confidence is tested at ``min_layer``, ``min_layer + check_every``, … (and the last
            layer always exits); fewer check layers cost fewer heads and, on the fast path, fewer host decisions.
        check_layers: dynamic exit: test confidence at exactly these layers (below the last; e.g. the exits a shared
            exit block was trained on, ``[15, 18, 22]``) instead of ``min_layer`` and ``check_every``.
        decide: where a dynamic exit's checks and adaptive drafting's stops are decided when the engine runs CUDA
            graphs: ``device`` (one graph per step whose branches are conditional nodes; the host never waits),
            ``host`` (a graph per piece, the host reading each decision: a synchronisation per check), ``auto``
            (``device`` where conditional nodes can be built: CUDA ≥ 12.4 with torch ≥ 2.12 or ``cuda-bindings``).
        context: a prompt whose tokens and ``max_new_tokens`` do not fit the model's window: ``refuse`` (one line, before
            any answer is generated) or ``truncate`` (keep its last tokens, with a warning counting those dropped).
        schedule: on a GPU with CUDA graphs, ``auto`` decodes dynamic exits at the subset of the check layers (none: full
            depth) that ran fastest on calibration prompts (the ``calibration`` prompts a decode call is given, else its
            own prompts at the first call of a setting and batch size), and self-speculates only where speculation ran
            faster than full depth there: a check whose cost its exits do not repay is left out. ``all``: every check
            layer, always speculate (the machinery as configured, for measuring it).
        fallback: on a GPU with CUDA graphs, dynamic exits and self-speculation time themselves against full depth
            (measured once per program on this card and batch) every few steps, and decode the rest of the answer at
            full depth when they are slower; the result says from which step. Speculative text is unchanged by it;
            dynamic text then takes the last layer's tokens. False keeps the adaptive rule to the end.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    engine: bool = True
    compile: bool = False
    compile_mode: Literal["auto", "gemv", "default", "max-autotune-no-cudagraphs"] = "auto"
    fast: bool | None = None
    exit: ExitMode = "fixed"
    threshold: float = 0.9
    min_layer: int | None = None
    measure: Measure = "softmax"
    check_every: int = 1
    check_layers: list[int] | None = None
    probe: str | None = None
    decide: Decide = "auto"
    context: Context = "refuse"
    schedule: Schedule = "auto"
    fallback: bool = True

    def __post_init__(self):
        positive("generation.max_new_tokens", self.max_new_tokens)
        require(self.temperature > 0 or not self.do_sample, "generation.temperature", self.temperature,
                "> 0 when sampling (generation.do_sample true)")
        non_negative("generation.temperature", self.temperature)
        in_unit("generation.top_p", self.top_p, low_open=True)
        non_negative("generation.threshold", self.threshold)
        positive("generation.min_layer", self.min_layer, optional=True)
        positive("generation.check_every", self.check_every)
        if self.check_layers is not None:
            require(len(self.check_layers) > 0 and all(layer >= 1 for layer in self.check_layers), "generation.check_layers",
                    self.check_layers, "a non-empty list of layers ≥ 1")
            object.__setattr__(self, "check_layers", sorted(set(self.check_layers)))
        if self.context not in ("refuse", "truncate"):
            raise EarlyExitError(f"generation.context {self.context!r}: choose refuse or truncate")
        if self.schedule not in ("auto", "all"):
            raise EarlyExitError(f"generation.schedule {self.schedule!r}: choose auto or all")
        if self.decide not in ("auto", "device", "host"):
            raise EarlyExitError(f"generation.decide {self.decide!r}: choose auto, device or host")
        if self.measure not in ("softmax", "margin", "state", "learned"):
            raise EarlyExitError(f"generation.measure {self.measure!r}: choose softmax, margin, state or learned")
        if self.measure == "learned" and self.probe is None:
            raise EarlyExitError("generation.measure learned reads an exit probe: set generation.probe to a directory "
                                 "written by scripts/fit_probe.py")
        if self.probe is not None:
            if not (Path(self.probe) / "exit_probe.json").is_file():
                raise EarlyExitError(f"generation.probe {self.probe}: no exit probe there (exit_probe.json); fit one with "
                                     "scripts/fit_probe.py")
            from earlyexit.provenance import check_weights

            check_weights(Path(self.probe) / "exit_probe.safetensors", "generation.probe: weight file")

    def but(self, **changes) -> GenerationArgs:
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes) if changes else self

    def min_layer_of(self, n_layers: int) -> int:
        """The dynamic exit's lowest exit on a model of ``n_layers`` blocks."""
        if self.check_layers is not None:
            return self.check_layers[0]
        return self.min_layer if self.min_layer is not None else default_min_layer(n_layers)

    def check_layers_of(self, n_layers: int) -> list[int]:
        """The layers below ``n_layers`` where a dynamic exit tests its confidence."""
        if self.check_layers is not None:
            require(self.check_layers[-1] < n_layers, "generation.check_layers", self.check_layers,
                    f"below the last layer ({n_layers}), which always exits")
            return list(self.check_layers)
        return list(range(self.min_layer_of(n_layers), n_layers, self.check_every))


def options(given: GenerationArgs | None, **changes) -> GenerationArgs:
    """``given`` (the defaults when None) with keyword ``changes``: how every decode path takes its options."""
    return (given or GenerationArgs()).but(**{k: v for k, v in changes.items() if v is not None})


def default_min_layer(n_layers: int) -> int:
    """The dynamic exit's default lowest exit: a quarter of the depth, rounded (8 of 30, 8 of 32)."""
    return max(1, round(n_layers / 4))


def example_seed(seed: int, example_id: int, layer: int = 0) -> int:
    """The sampling seed of one example (and exit): fixed by the run's seed, whatever the batching or resume."""
    return seed * 1_000_003 + example_id * 1_009 + layer


def select(args: GenerationArgs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The token choice over ``[R, V]`` logits: greedy argmax, or temperature / nucleus sampling."""
    if not args.do_sample:
        return lambda logits: logits.argmax(-1)
    return lambda logits: sample(probabilities(logits, args.temperature, args.top_p))


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution: softmax of temperature-scaled logits restricted to the top-p nucleus."""
    return nucleus(logits / temperature, top_p).softmax(-1)


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row: argmax of p / Exp(1) noise (exact, and needs no host sync, so CUDA graphs keep it)."""
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-p nucleus set to -inf (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    ordered, order = logits.sort(-1, descending=True)
    mass = ordered.softmax(-1).cumsum(-1)
    drop = mass - ordered.softmax(-1) > top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
