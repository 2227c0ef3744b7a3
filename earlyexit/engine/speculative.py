"""Self-speculative decoding (LayerSkip, Elhoushi et al., 2024): draft with the first E blocks, verify with all.

A cycle drafts d tokens from exit E, then verifies them with the full model in one pass that reuses the draft's
KV and layer-E states below E. Greedy output equals full-depth greedy decoding; sampled output follows the full
model's distribution (the speculative acceptance rule of Leviathan et al., 2023). Rows of a batch accept
different numbers of drafts and continue at their own slots; a cycle is one CUDA graph replay on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import Callable

from earlyexit.engine.control import Branch
from earlyexit.engine.core import Behind, Core, Stops, Stretch
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs, options, probabilities, sample
from earlyexit.model import Generation


@dataclass
class SpeculativeGeneration(Generation):
    """A :class:`Generation` plus draft statistics: ``drafted`` and ``accepted`` tokens, ``cycles`` run, and
    ``full_from``: the answer length (longest row) from which it decoded one full-depth token a step because the cycles
    were slower (None: never; ``generation.fallback``; 0: ``generation.schedule`` found full depth faster here). The
    text is the same either way."""

    drafted: int = 0
    accepted: int = 0
    cycles: int = 0
    full_from: int | None = None

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)


class SelfSpeculation(Core):
    """The engine's self-speculative mode (mixed into :class:`earlyexit.engine.Engine`)."""

    @torch.no_grad()
    def generate_speculative(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        draft_layer: int,
        n_draft: int = 4,
        generation: GenerationArgs | None = None,
        *,
        draft_threshold: float = 0.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
        **changes,
    ) -> SpeculativeGeneration:
        """Self-speculative decoding (LayerSkip): draft ``n_draft`` tokens from exit ``draft_layer``, verify them
        with the full model in one pass, keep the agreeing prefix plus the full model's next token.

        The verification reuses the draft: blocks ≤ E already wrote the drafted tokens' KV and produced their
        layer-E states, so it runs blocks ≤ E for the last draft only and blocks > E for all of them. With a shared
        exit block (exit adapters of kind block, Kangaroo's drafter) the drafts read exit E through it, and its cache
        is written at every position whose layer-E state is computed, the prompt's included. Greedy
        output equals full-depth greedy decoding; sampling uses the speculative acceptance rule (accept a draft
        with probability min(1, p/q), else draw from the normalised max(0, p − q)), so tokens follow the full
        model's distribution. Rows of a batch accept different numbers of tokens and continue at their own slots.

        Args:
            input_ids, attention_mask: ``[B, T]`` left-padded prompts.
            draft_layer: E, the exit that drafts (1..N−1).
            n_draft: d, tokens drafted per cycle at most.
            draft_threshold: adaptive drafting (Kangaroo): a cycle stops drafting at the first draft that no running
                row's draft exit gives at least this probability, and verifies the drafts before it (none: one
                full-depth step). Exactness is unchanged; the stops are decided on the device (``generation.decide``).
                0 always drafts d.
            generation, eos_token_id, pad_token_id, ignore_eos, changes: as :meth:`Core.generate`.
            calibration: prompts to time speculation against full depth on (``generation.schedule auto``; default:
                these prompts), at the first call of a setting and batch size.
        """
        args = options(generation, **changes)
        self._fast_shared_only("self-speculative drafts")
        exit_layer = self.ee.check_layer(draft_layer)
        if exit_layer >= self.n_layers:
            raise EarlyExitError(f"draft layer {draft_layer} must be below the last layer {self.n_layers}")
        if n_draft < 1:
            raise EarlyExitError(f"n_draft must be at least 1, got {n_draft}")
        if not 0 <= draft_threshold <= 1:
            raise EarlyExitError(f"draft_threshold must be in [0, 1], got {draft_threshold}")
        stops = self.stops(eos_token_id, pad_token_id, ignore_eos)
        ids, mask = self._shape(input_ids, attention_mask)
        speculate = True
        if self.schedules(args):  # speculate only where it ran faster than full depth
            key = ("speculative", exit_layer, n_draft, draft_threshold, ids.shape[0], args.max_new_tokens, args.do_sample,
                   args.temperature, args.top_p, stops, args.decide, args.fallback)
            def decode(candidate, cal_ids, cal_mask):
                return self._speculative(cal_ids, cal_mask, exit_layer, n_draft, args, stops, draft_threshold, candidate)

            speculate = self._fastest(key, [False, True], decode, lambda: self._calibration(calibration, ids, mask))
            out = self._speculative(ids, mask, exit_layer, n_draft, args, stops, draft_threshold, speculate)
            self._observe(key, bool(speculate) and out.full_from is not None, False)  # falling back: full depth
            return out
        return self._speculative(ids, mask, exit_layer, n_draft, args, stops, draft_threshold, speculate)

    def _speculative(self, ids, mask, exit_layer: int, n_draft: int, args: GenerationArgs, stops: Stops,
                     draft_threshold: float, speculate: bool = True) -> SpeculativeGeneration:
        """:meth:`generate_speculative` on prompts already on the device; ``speculate`` False: full depth, one token a
        step (the same text; ``full_from`` 0)."""
        if not speculate:
            out = self._exits_run(ids, mask, [self.n_layers], args, stops)[self.n_layers]
            return SpeculativeGeneration(out.tokens, out.n_tokens, out.finished, 0, 0, 0, 0)
        batch, prompt = ids.shape
        key = ("speculative", exit_layer, n_draft, draft_threshold, batch, prompt, args.max_new_tokens, args.do_sample,
               args.temperature, args.top_p, stops, args.decide, args.fallback)
        program = self._program(key, lambda: self._speculative_program(exit_layer, n_draft, batch, prompt, args, stops,
                                                                       draft_threshold))
        out, (drafted, accepted, cycles), switched = program(ids, mask)
        result = stops.finish(out[:, : args.max_new_tokens], args.max_new_tokens)
        return SpeculativeGeneration(result.tokens, result.n_tokens, result.finished, drafted, accepted, cycles, switched)

    def _speculative_program(self, exit_layer: int, depth: int, batch: int, prompt: int, args: GenerationArgs, stops: Stops,
                             draft_threshold: float = 0.0):
        max_new_tokens, pad, do_sample = args.max_new_tokens, stops.pad, args.do_sample
        width = max_new_tokens + depth + 2  # the last column takes the writes of rows that are done
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + width + depth)  # done rows still draft
        banned, ends = stops.tensors(self.device)
        out = torch.full((batch, width), pad, dtype=torch.long, device=self.device)
        cur = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        pos = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        count = torch.ones(batch, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        running = torch.zeros((), dtype=torch.bool, device=self.device)  # some row is not done: the cycle's guard
        stats = torch.zeros(3, dtype=torch.long, device=self.device)  # drafted, accepted, cycles
        offsets = torch.arange(depth + 1, device=self.device)
        rows = torch.arange(batch, device=self.device)
        # a cycle's drafts, written by its pieces in place: layer-E states of cur and of each draft, the drafts, their
        # draft distributions (sampling), whether draft j was sure enough to go on (adaptive drafting), how many were
        # proposed
        states = torch.zeros(batch, depth + 1, self.ee.config.hidden_size, dtype=self.dtype, device=self.device)
        drafts = torch.zeros(batch, depth, dtype=torch.long, device=self.device)
        q = torch.zeros(batch, depth, self.ee.config.vocab_size, device=self.device) if do_sample else None
        sure = torch.zeros(depth, dtype=torch.bool, device=self.device)
        proposed = torch.zeros((), dtype=torch.long, device=self.device)

        def dist(hidden, layer=None):
            logits = self._decode_logits(hidden, banned, layer)
            return probabilities(logits, args.temperature, args.top_p) if do_sample else logits

        def choose(scores):
            return sample(scores) if do_sample else scores.argmax(-1)

        shared = self.shared is not None and self.ee.adapters.has_block(exit_layer)
        group = [(exit_layer, batch)]

        def lower(j: int) -> torch.Tensor:
            """Blocks ≤ E for the token at ``pos + j`` (cur, or draft j − 1): its KV and its layer-E state; with a
            shared exit block, that block's KV too. Returns the state the draft exit reads."""
            token = cur if j == 0 else drafts[:, j - 1 : j]
            hidden, kwargs, masks = self._decode_inputs(token, pos + j, valid, npad, cache)
            states[:, j : j + 1].copy_(self._decode_blocks(hidden, kwargs, masks, range(1, exit_layer + 1)))
            if shared:  # the drafter reads the exit through the shared block, whose cache follows every position
                return self._shared_block(states[:, j : j + 1], kwargs, masks, group, self._run_block)[:, 0]
            return states[:, j]

        def draft(j: int):
            def run():
                scores = dist(lower(j), exit_layer)  # the draft exit, through its adapter
                drafts[:, j].copy_(choose(scores))
                if do_sample:
                    q[:, j].copy_(scores)
                if draft_threshold > 0:  # Kangaroo: stop drafting once no running row is sure of its next draft
                    top = (scores if do_sample else scores.softmax(-1)).max(-1).values
                    go = ((top >= draft_threshold) & ~done).any()
                    sure[j].copy_(go)
                    if j == 0:
                        proposed.copy_(go.long())
                    else:
                        proposed.add_(go.long())

            return run

        def verify(k: int):
            def run():  # blocks > E over cur and k draft slots (the first ``proposed`` of them drafted), keep the agreeing prefix
                slots = drafts[:, :k]
                _, kwargs, masks = self._decode_inputs(torch.cat([cur, slots], 1), pos + offsets[: k + 1], valid, npad, cache)
                target = dist(self._decode_blocks(states[:, : k + 1], kwargs, masks, range(exit_layer + 1, self.n_layers + 1)))
                drafted = offsets[None, :k] < (proposed if draft_threshold > 0 else k)  # [1, k]
                if do_sample:
                    p_draft = target[:, :k].gather(-1, slots[..., None])[..., 0]
                    q_draft = q[:, :k].gather(-1, slots[..., None])[..., 0]
                    ok = (torch.rand_like(p_draft) * q_draft < p_draft) & drafted
                    # after a rejected draft, the normalised max(0, p - q); after the last one drafted, p itself
                    residual = torch.where(drafted[..., None], (target[:, :k] - q[:, :k]).clamp(min=0), target[:, :k])
                    residual = torch.cat([residual, target[:, k:]], 1)  # [B, k+1, V]
                    accepted = ok.long().cumprod(1).sum(1)
                    fix = residual[rows, accepted]
                    nxt = sample(fix / fix.sum(-1, keepdim=True).clamp(min=1e-30))
                else:
                    best = target.argmax(-1)  # [B, k+1]
                    accepted = ((slots == best[:, :k]) & drafted).long().cumprod(1).sum(1)
                    nxt = best.gather(1, accepted[:, None])[:, 0]
                new = torch.cat([slots, nxt[:, None]], 1).scatter(1, accepted[:, None], nxt[:, None])  # [B, k+1]
                keep = (offsets[None, : k + 1] <= accepted[:, None]) & ~done[:, None]
                out.scatter_(1, torch.where(keep, count[:, None] + offsets[: k + 1], width - 1), new)
                advance = torch.where(done, 0, accepted + 1)
                finished = (keep & torch.isin(new, ends)).any(1) if ends is not None else torch.zeros_like(done)
                n_drafted = drafted.sum() if k else count.new_zeros(())
                stats.add_(torch.stack([(~done).sum() * n_drafted, torch.where(done, 0, accepted).sum(), (~done).any().long()]))
                count.add_(advance)
                pos.add_(advance[:, None])
                cur.copy_(torch.where(done, cur[:, 0], nxt)[:, None])
                done.logical_or_(finished | (count >= max_new_tokens))
                running.copy_(~done.all())

            return run

        def chain(j: int):
            """Draft j and, while some running row is sure of its drafts (adaptive drafting), the ones after it."""
            if j == depth:
                return [lambda: lower(depth)]  # the last draft's layer-E state, for the verification
            rest = chain(j + 1)
            return [draft(j), Branch(sure[j], rest)] if draft_threshold > 0 else [draft(j), *rest]

        # a cycle, guarded (the host looks only every few cycles)
        cycle = Branch(running, [*chain(0), verify(depth)])
        keep_one = self._compiled(take)

        def full():  # the fallback: full depth's own step, one token a running row (nothing is drafted any more)
            hidden, kwargs, masks = self._decode_inputs(cur, pos, valid, npad, cache)
            token = choose(dist(self._decode_blocks(hidden, kwargs, masks, range(1, self.n_layers + 1))[:, -1]))
            keep_one(token, out, count, pos, cur, done, running, stats, ends, max_new_tokens)

        def start(ids):  # the prompt at full depth, its answer (column 0) and the first cycle's inputs
            out.fill_(pad)
            if shared:  # the prompt's layer-E states through the shared block too: its cache for the drafts
                slots = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
                hidden, kwargs, masks = self._inputs(ids, slots, valid, npad, cache)
                hidden = self._blocks(hidden, kwargs, masks, range(1, exit_layer + 1))
                self._shared_block(hidden, kwargs, masks, group)
                last = self._blocks(hidden, kwargs, masks, range(exit_layer + 1, self.n_layers + 1))[:, -1]
            else:
                last = self._prefill(ids, valid, npad, cache, range(1, self.n_layers + 1))[:, -1]
            first = choose(dist(last))
            out[:, 0] = first
            cur.copy_(first[:, None])
            pos.fill_(prompt)
            count.fill_(1)
            done.copy_(torch.isin(first, ends) if ends is not None else torch.zeros_like(done))
            running.copy_(~done.all())
            stats.zero_()

        state = [out, cur, pos, count, done, running, stats, states, drafts, sure, proposed] + ([q] if do_sample else [])
        start = self._prompt_pass(start, (batch, prompt), state, graph=not do_sample)
        steps = {}  # the cycle and its fallback, built (captured, on a GPU) at the first call

        # sampling draws inside the cycle: random numbers inside conditional nodes are not replayed faithfully
        decide = "host" if do_sample else args.decide

        def run(ids, mask):
            start(load(ids, mask))
            if not steps:
                steps["cycle"] = self._stepper(cycle, state, decide)
                if self.falls_back(args):
                    step = self._graph(full, state)
                    steps["full"] = (step, self._time(step, state))
            switched = until_all_done(steps["cycle"], running, count, max_new_tokens, steps.get("full"))
            return out.clone(), stats.tolist(), switched

        return run


def take(token: torch.Tensor, out: torch.Tensor, count: torch.Tensor, pos: torch.Tensor, cur: torch.Tensor,
         done: torch.Tensor, running: torch.Tensor, stats: torch.Tensor, ends: torch.Tensor | None,
         max_new_tokens: int) -> None:
    """One token ``[R]`` for each running row of a speculative program (its fallback's full-depth step), in place: the
    row's next column of ``out`` (done rows write the last column), its count and position, its input, whether it is
    done; a cycle in ``stats``."""
    width = out.shape[1]
    column = torch.where(done, width - 1, count)[:, None]
    out.scatter_(1, column, token[:, None])
    step = (~done).long()
    finished = ~done & torch.isin(token, ends) if ends is not None else torch.zeros_like(done)
    stats.add_(torch.stack([torch.zeros_like(stats[0]), torch.zeros_like(stats[0]), (~done).any().long()]))
    count.add_(step)
    pos.add_(step[:, None])
    cur.copy_(torch.where(done, cur[:, 0], token)[:, None])
    done.logical_or_(finished | (count >= max_new_tokens))
    running.copy_(~done.all())


CYCLES_BETWEEN_LOOKS = 4
"""Speculative cycles between the host's looks at the results (is every row done? is speculation slower than full
depth?). A cycle a row has no work for costs only its guard's condition."""


def until_all_done(cycle: Callable[[], None], running: torch.Tensor, count: torch.Tensor, max_new_tokens: int,
                   full: tuple[Callable[[], None], float] | None = None) -> int | None:
    """Run speculative cycles until no row is running (each adds at least one token to every running row, so at most
    ``max_new_tokens`` of them), looking every :data:`CYCLES_BETWEEN_LOOKS` cycles.

    ``full``: (the full-depth step, its GPU seconds): once the cycles so far made fewer tokens than full depth would
    have in their time (:class:`~earlyexit.engine.core.Behind`), the rest of the answer runs the full-depth step.
    Returns the token count (of the longest row) at which it switched (None: never)."""
    timer = Stretch() if full is not None else None
    behind = Behind(full[1]) if full is not None else None
    switched, before = None, count.clone()
    for c in range(1, max_new_tokens + 1):
        cycle()
        if c % CYCLES_BETWEEN_LOOKS and c != max_new_tokens:
            continue
        if not bool(running):
            return switched
        if timer is not None and switched is None:
            grown = count - before  # a row's tokens: full depth makes one a step for every row still running
            if behind.add(timer.seconds(), int(grown.sum()) / max(int((grown > 0).sum()), 1)):
                cycle, switched = full[0], int(count.max())
            else:
                timer.restart()
                before = count.clone()
    return switched
