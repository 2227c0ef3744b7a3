"""Early-exit training loss and curricula (LayerSkip, Elhoushi et al., 2024; as in torchtune's recipe).

total = Σ_{l ∈ active} w_l · [ (1 − α) · CE(exit_l, labels) + α · KL(teacher ‖ exit_l) ] / Σ w_l

Everything here is a pure function of tensors and of the step, so a resumed run needs no extra state.
Exit logits are computed per exit and per chunk of answer tokens under activation checkpointing, so at
most one ``[chunk, V]`` block of logits is alive at a time, in the forward and the backward pass; the
``[exits, batch, seq, vocab]`` tensor never exists.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from earlyexit.tokens import IGNORE_INDEX

WeightScheme = Literal["uniform", "linear", "sum_l"]
Curriculum = Literal["none", "rotational", "gradual"]


def exit_weights(exit_layers: list[int], n_layers: int, scheme: WeightScheme = "sum_l", e_scale: float = 1.0) -> dict[int, float]:
    """Weights of the exits, normalised to sum to 1.

    ``uniform``: 1; ``linear``: l; ``sum_l``: 1 + 2 + … + l (LayerSkip's cumulative scale). ``e_scale``
    multiplies every exit below the last, so the last layer's share can be protected (``e_scale < 1``).
    """
    raw = {}
    for layer in exit_layers:
        w = {"uniform": 1.0, "linear": float(layer), "sum_l": layer * (layer + 1) / 2.0}[scheme]
        raw[layer] = w * (e_scale if layer < n_layers else 1.0)
    total = sum(raw.values())
    return {layer: w / total for layer, w in raw.items()}


def active_exits(step: int, exit_layers: list[int], n_layers: int, curriculum: Curriculum = "none",
                 rotation: int = 2, gradual_interval: int = 100) -> list[int]:
    """Exits trained at ``step``; the last layer is always among them.

    ``rotational``: every ``rotation``-th early exit, the offset advancing by one each step.
    ``gradual``: early exits are switched on from the deepest to the shallowest, one more every
    ``gradual_interval`` steps.
    """
    early = [layer for layer in exit_layers if layer < n_layers]
    if curriculum == "rotational":
        early = [layer for i, layer in enumerate(early) if (i - step) % rotation == 0]
    elif curriculum == "gradual":
        enabled = min(len(early), step // gradual_interval)
        early = early[len(early) - enabled :] if enabled else []
    return early + [n_layers]


@dataclass
class LossOutput:
    """The weighted total and, per exit, its unweighted cross-entropy (nats/token, detached)."""

    total: torch.Tensor
    per_exit: dict[int, torch.Tensor]


def kl_to_teacher(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) in nats per row. teacher, student: [..., V] log-probabilities → [...]."""
    return (teacher.exp() * (teacher - student)).sum(-1)


@dataclass
class SparseTeacher:
    """A teacher's top-k next-token log-probabilities per answer position (a teacher cache, built once instead of a
    teacher forward per step): ``ids`` ``[M, k]`` token ids, ``logp`` ``[M, k]`` their log-probabilities.

    Its KL to a student, Σ_top-k p (log p − log q), leaves out the teacher's tail beyond the k tokens; with k = V it
    is the exact KL. Sliced by position like a dense ``[M, V]`` teacher.
    """

    ids: torch.Tensor
    logp: torch.Tensor

    def __getitem__(self, index) -> SparseTeacher:
        return SparseTeacher(self.ids[index], self.logp[index])

    def kl(self, student: torch.Tensor) -> torch.Tensor:
        """KL over the kept tokens in nats per row. student: ``[M, V]`` log-probabilities → ``[M]``."""
        logp = self.logp.float()
        return (logp.exp() * (logp - student.gather(-1, self.ids.long()))).sum(-1)


def pulled_teacher(teacher: torch.Tensor, exit_logp: torch.Tensor, pull: float) -> torch.Tensor:
    """The last layer's teacher pulled towards an early exit: the normalised geometric mean teacher^(1−β) · exit^β.

    The last layer then learns something the exit can already say, so their top-1 tokens agree more often (what
    self-speculation accepts and a dynamic exit keeps), at some cost to the last layer's own quality.

    Args:
        teacher: ``[M, V]`` the teacher's log-probabilities (the base model's last layer).
        exit_logp: ``[M, V]`` the exit's log-probabilities, detached.
        pull: β in [0, 1]; 0 returns ``teacher``, 1 the exit.
    """
    if pull <= 0:
        return teacher
    return torch.log_softmax((1 - pull) * teacher.float() + pull * exit_logp.float(), dim=-1)


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, target: torch.Tensor,
                teacher: torch.Tensor | SparseTeacher | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and summed distillation KL of one chunk. hidden: [M, D]; target: [M]; teacher: [M, V] log-probs
    or a :class:`SparseTeacher`."""
    logp = F.log_softmax(head(hidden).float(), dim=-1)  # [M, V]
    ce = F.nll_loss(logp, target, reduction="sum")
    if teacher is None or alpha <= 0:
        kl = logp.new_zeros(())
    else:
        kl = (teacher.kl(logp) if isinstance(teacher, SparseTeacher) else kl_to_teacher(teacher, logp)).sum()
    return ce, kl


@dataclass
class LinearHead:
    """An exit's output as the fused loss takes it: logits = softcap(pre(h, layer) @ weight.T + bias), with a frozen
    ``weight`` (and ``bias``). ``pre``: the exit adapter and the final norm (trained through autograd as usual);
    ``softcap``: Gemma-2's final logit soft-capping, or None."""

    pre: Callable[[torch.Tensor, int], torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None


def chunk_terms(z: torch.Tensor, target: torch.Tensor, t_logp: torch.Tensor | None, t_ids: torch.Tensor | None,
                alpha: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of the fused loss from its logits: summed CE, summed KL and the gradient of ``(1 − α)·CE + α·KL``
    with respect to the logits (before soft-capping).

    Args:
        z: ``[M, V]`` logits (any float dtype; computed in float32).
        target: ``[M]`` next-token ids.
        t_logp: the teacher's log-probabilities, ``[M, V]`` (dense) or ``[M, k]`` (top-k with ``t_ids``), or None.
        t_ids: ``[M, k]`` the top-k teacher's token ids, or None for a dense teacher.
        alpha: the KL's share.
        softcap: Gemma-2's final logit soft-capping, or None.
    """
    z = z.float()
    if softcap is not None:
        squashed = torch.tanh(z / softcap)
        z = squashed * softcap
    logp = F.log_softmax(z, dim=-1)  # [M, V]
    q = logp.exp()
    onehot = F.one_hot(target, z.shape[-1]).to(z.dtype)  # [M, V]
    ce = -(logp * onehot).sum()
    dz = (1 - alpha) * (q - onehot)
    kl = z.new_zeros(())
    if t_logp is not None:
        t_logp = t_logp.float()
        p = t_logp.exp()
        if t_ids is None:  # dense [M, V]
            kl = (p * (t_logp - logp)).sum()
            dz = dz + alpha * (q - p)
        else:  # top-k [M, k]
            ids = t_ids.long()
            kl = (p * (t_logp - logp.gather(-1, ids))).sum()
            dz = dz + alpha * p.sum(-1, keepdim=True) * q
            dz = dz.scatter_add(-1, ids, -alpha * p)
    if softcap is not None:
        dz = dz * (1 - squashed.square())
    return ce, kl, dz


_COMPILED_TERMS = None


def _compiled_chunk_terms():
    """:func:`chunk_terms` through ``torch.compile`` (shapes dynamic: the last chunk is shorter), built once."""
    global _COMPILED_TERMS
    if _COMPILED_TERMS is None:
        _COMPILED_TERMS = torch.compile(chunk_terms, dynamic=True)
    return _COMPILED_TERMS


class _FusedExitLoss(torch.autograd.Function):
    """(1 − α)·CE + α·KL summed over rows, from the head's input, with its gradient computed in the forward pass.

    Per chunk of rows: logits in the weight's dtype, log-softmax in float32, the loss, and at once the gradient with
    respect to the logits, ``((1 − α) + α·s)·q − (1 − α)·onehot − α·p`` (q the exit's probabilities, p the teacher's,
    s = Σp: 1 for a dense teacher, the kept mass for a top-k one), times the weight: the gradient with respect to the
    input, kept for the backward pass. No ``[rows, V]`` block outlives its chunk and the backward pass runs no head
    product again (the checkpointed reference runs it twice more: recompute and gradient). On a GPU the chunk's
    element-wise work (:func:`chunk_terms`) is compiled, so its passes over ``[rows, V]`` fuse.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, teacher_logp, teacher_ids, alpha, softcap, chunk):
        grad = torch.empty_like(x) if x.requires_grad else None
        ce_sum = x.new_zeros((), dtype=torch.float32)
        kl_sum = x.new_zeros((), dtype=torch.float32)
        terms = _compiled_chunk_terms() if x.is_cuda else chunk_terms  # on a GPU its element-wise passes fuse
        for start in range(0, x.shape[0], chunk):
            piece = slice(start, start + chunk)
            t_logp = teacher_logp[piece] if teacher_logp is not None and alpha > 0 else None
            t_ids = teacher_ids[piece] if t_logp is not None and teacher_ids is not None else None
            z = F.linear(x[piece], weight, bias)
            ce, kl, dz = terms(z, target[piece], t_logp, t_ids, alpha, softcap)
            ce_sum += ce
            kl_sum += kl
            if grad is not None:
                grad[piece] = dz.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        mix = (1 - alpha) * ce_sum + alpha * kl_sum
        return mix, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_mix, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return (grad * grad_mix.to(grad.dtype),) + (None,) * 8


def fused_exit_loss(x: torch.Tensor, head: LinearHead, target: torch.Tensor, teacher: torch.Tensor | SparseTeacher | None,
                    alpha: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed ``(1 − α)·CE + α·KL`` (differentiable in ``x``), summed CE and summed KL of rows ``x`` ``[M, D]`` (the
    head's input) against ``target`` ``[M]`` and ``teacher`` (as :func:`early_exit_loss`)."""
    if isinstance(teacher, SparseTeacher):
        t_logp, t_ids = teacher.logp, teacher.ids
    else:
        t_logp, t_ids = teacher, None
    if alpha <= 0:
        t_logp = t_ids = None
    return _FusedExitLoss.apply(x, head.weight, head.bias, target, t_logp, t_ids, float(alpha), head.softcap, chunk_size)


def early_exit_loss(
    hidden: dict[int, torch.Tensor],
    labels: torch.Tensor,
    head: Callable[[torch.Tensor, int], torch.Tensor],
    weights: dict[int, float],
    teacher: torch.Tensor | SparseTeacher | dict[int, torch.Tensor] | None = None,
    alpha: float = 0.0,
    chunk_size: int = 1024,
    tokens: float | None = None,
    fused: LinearHead | None = None,
) -> LossOutput:
    """Weighted early-exit loss over the answer tokens.

    Args:
        hidden: ``{layer: [B, T, D]}`` raw block outputs (see ``EarlyExitHead.hidden_states``).
        labels: ``[B, T]`` token ids, -100 where no loss is taken (the prompt, padding).
        head: ``(raw hidden [M, D], exit layer)`` → logits ``[M, V]`` (exit adapter if any, the model's own final norm
            and head: :meth:`earlyexit.model.EarlyExitHead.exit_logits`).
        weights: ``{layer: w}`` over the active exits (renormalised here).
        teacher: optional ``[M, V]`` log-probabilities at the answer positions (e.g. the base model's final
            layer), or their top-k (:class:`SparseTeacher`, from a teacher cache), for self-distillation; or
            ``{layer: teacher}``, one per exit (:func:`pulled_teacher` for the last layer).
        alpha: share of the distillation term, 0..1.
        chunk_size: answer tokens per logits block.
        tokens: the token count the sums are divided by; this batch's answer tokens when None. Under data
            parallelism, the global count divided by the world size makes the rank-averaged loss (and
            gradient) the token mean over the global batch, as in one process.
        fused: the same head split for the fused loss (:func:`fused_exit_loss`: no float32 logits kept, no head
            product recomputed); None: the checkpointed reference, per chunk.
    """
    target = labels[:, 1:]  # [B, T-1]: position t predicts token t + 1
    keep = target != IGNORE_INDEX
    tgt = target[keep]  # [M]
    count = max(int(tgt.numel()), 1) if tokens is None else max(float(tokens), 1e-9)
    norm = sum(weights.values())
    total = None
    per_exit = {}
    teachers = teacher if isinstance(teacher, dict) else None
    for layer, weight in weights.items():
        states = hidden[layer][:, :-1][keep]  # [M, D]
        if teachers is not None:
            teacher = teachers[layer]
        if fused is not None:
            mix, ce_sum, _ = fused_exit_loss(fused.pre(states, layer), fused, tgt, teacher, alpha, chunk_size)
            per_exit[layer] = (ce_sum / count).detach()
            total = weight / norm * mix / count if total is None else total + weight / norm * mix / count
            continue
        exit_head = functools.partial(head, layer=layer)
        ce_sum = kl_sum = None
        for start in range(0, states.shape[0], chunk_size):
            piece = slice(start, start + chunk_size)
            t_piece = teacher[piece] if teacher is not None else None
            if torch.is_grad_enabled() and states.requires_grad:
                ce, kl = checkpoint(_chunk_loss, exit_head, states[piece], tgt[piece], t_piece, alpha, use_reentrant=False)
            else:
                ce, kl = _chunk_loss(exit_head, states[piece], tgt[piece], t_piece, alpha)
            ce_sum = ce if ce_sum is None else ce_sum + ce
            kl_sum = kl if kl_sum is None else kl_sum + kl
        if ce_sum is None:  # no answer token in this batch
            ce_sum = kl_sum = states.sum() * 0.0
        loss = ((1 - alpha) * ce_sum + alpha * kl_sum) / count
        per_exit[layer] = (ce_sum / count).detach()
        total = weight / norm * loss if total is None else total + weight / norm * loss
    return LossOutput(total=total, per_exit=per_exit)


@torch.no_grad()
def top1_agreement(hidden: dict[int, torch.Tensor], labels: torch.Tensor, head: Callable[[torch.Tensor, int], torch.Tensor],
                   final: int, chunk_size: int = 1024) -> dict[int, torch.Tensor]:
    """Teacher-forced top-1 agreement of each exit with the final layer on the answer tokens: the share of positions
    where exit L's most likely next token is the final layer's. It is what self-speculation from exit L accepts per
    drafted token when drafts are checked greedily (the first disagreement ends a draft).

    Args:
        hidden: ``{layer: [B, T, D]}`` raw block outputs, ``final`` among them.
        labels: ``[B, T]``, ``IGNORE_INDEX`` where there is no answer token.
        head: ``(hidden [M, D], layer)`` → logits ``[M, V]``.
        final: the last layer.

    Returns:
        ``{layer: agreement}`` (0-d tensors in [0, 1]) for every layer of ``hidden`` but ``final``.
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    pick = lambda layer: hidden[layer][:, :-1][keep]  # noqa: E731  [M, D]
    reference = torch.cat([head(piece, final).argmax(-1) for piece in pick(final).split(chunk_size)])  # [M]
    out = {}
    for layer in hidden:
        if layer == final:
            continue
        guess = torch.cat([head(piece, layer).argmax(-1) for piece in pick(layer).split(chunk_size)]) if reference.numel() else reference
        out[layer] = (guess == reference).float().mean() if reference.numel() else reference.new_zeros((), dtype=torch.float)
    return out


def accepted_per_cycle(agreement: float, n_draft: int) -> float:
    """Expected tokens a self-speculative cycle keeps, drafts and the verifier's own token, when each draft agrees
    with probability ``agreement`` independently: 1 + a + a² + … + a^d."""
    return sum(agreement**k for k in range(n_draft + 1))


def speculative_speedup(agreement: float, draft_layer: int, n_layers: int, n_draft: int) -> float:
    """Expected speed-up of self-speculation over full-depth decoding, in a memory-bound cost model (DEL's choice of E
    and d from measured acceptance): a draft token costs E/N of a full-depth step, a verification
    pass of d + 1 tokens costs one step, and a cycle keeps :func:`accepted_per_cycle` tokens. Overheads (host, head,
    launch) are ignored, so it is an upper bound for small models."""
    return accepted_per_cycle(agreement, n_draft) / (1 + n_draft * draft_layer / n_layers)


def best_n_draft(agreement: float, draft_layer: int, n_layers: int, max_draft: int = 8) -> tuple[int, float]:
    """The drafted tokens per cycle d (1..``max_draft``) with the highest :func:`speculative_speedup`, and that speed-up."""
    return max(((d, speculative_speedup(agreement, draft_layer, n_layers, d)) for d in range(1, max_draft + 1)),
               key=lambda pair: pair[1])


def layer_dropout_rates(n_layers: int, p_max: float, scale: Literal["exp", "linear", "uniform"] = "exp") -> list[float]:
    """Skip probability of blocks 1..N: ``p_max · D(l)``, D rising from 0 at the first block to 1 at the last.

    ``exp``: D(l) = 2^((l−1)/(N−1)) − 1 (LayerSkip's exponential); ``linear``: (l−1)/(N−1); ``uniform``: 1.
    """
    rates = []
    for layer in range(1, n_layers + 1):
        x = (layer - 1) / max(n_layers - 1, 1)
        d = {"exp": math.pow(2.0, x) - 1.0, "linear": x, "uniform": 1.0}[scale]
        rates.append(p_max * d)
    return rates


def dropped_layers(step: int, rates: list[float], seed: int = 0) -> set[int]:
    """Blocks (1..N) skipped at ``step``: a seeded draw per step, so a resumed run drops the same blocks."""
    if not any(rates):
        return set()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draws = torch.rand(len(rates), generator=gen)
    return {layer for layer, (u, p) in enumerate(zip(draws.tolist(), rates), start=1) if u < p}
