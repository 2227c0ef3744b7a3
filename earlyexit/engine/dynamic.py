"""Dynamic early exits (CALM, Schuster et al., 2022): each token stops at the first confident layer.

A token exits at the first check layer (``min_layer``, ``min_layer + check_every``, …, or the ``check_layers``
listed) whose :func:`confidence` reaches the threshold; the last layer always exits. Tokens after it still need keys
and values at the layers it skipped: its exit state is propagated upwards (CALM's choice), i.e. every block above
the exit takes the exit hidden state as that token's input, so its keys and values there are the K/V projections of
that state.

Two ways to run the same rule:

* **skipping** (the fast path of llama-style families): the step is a plan (:mod:`earlyexit.engine.control`) cut at
  the check layers. Each check is :func:`decide`, one compiled function (the blocks' pending add, the confidence, the
  decision, the flags the branch reads): whether every row of the batch has exited (or ended its answer). If so the
  blocks above are not run, and their keys and values for this position wait (at most :data:`DEFER` steps) until a
  later token goes on past the first check, when :class:`~earlyexit.engine.fast.KVFill` writes every waiting
  position's K/V of the exit states in one batched product; with a head measure the step's token is the one the check
  chose. With the learned measure the last block's residual add stays pending across a check (``carried``): the next
  piece's first block fuses it with its norm, as every block of full depth does, and runs full depth's own compiled
  block. On a GPU the whole step is one CUDA graph whose branches are conditional nodes (``generation.decide
  device``), or a graph per piece with the host reading each flag (``host``: a synchronisation per check). With the
  ``learned`` measure (:mod:`earlyexit.probe`) a check reads a probe instead of the head, and the shared exit block
  runs only for rows that exit there; its keys and values at the checks the others passed come from their inputs in
  one product a step. ``generation.schedule auto`` first times which of the check layers pay (:meth:`Core._fastest`).
* **propagating** (other families, the model's own blocks): every block still runs for every token, the exited rows
  taking their exit state as input; one CUDA graph per step. It measures quality against depth, not time.

A batch skips only above the layer where its *last* row exits: rows that exited earlier ride along (their inputs
held at their exit state) until then. Letting them leave the batch instead (gathering the running rows, a program
per row count) was built and measured slower on SmolLM2 at batch 8 (0.63× full depth against 0.78×): a decode step
of a small model costs the same for 4 rows as for 8, so fewer rows save nothing while the gathers and the extra
fills cost launches (docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from earlyexit.engine.check import available as fused_check_runs
from earlyexit.engine.check import fused_advance, fused_decide, fused_wait
from earlyexit.engine.control import Branch, resolve
from earlyexit.engine.core import DEFER, Columns, Core, Stops, until_done
from earlyexit.generation import GenerationArgs, Measure, options
from earlyexit.model import Generation
from earlyexit.probe import ExitProbe, features

SUBSETS_OF = 4
"""A schedule times every subset of at most this many check layers; of more, each one alone, all of them, and none."""


def confidence(logits: torch.Tensor | None, hidden: torch.Tensor, previous: torch.Tensor, measure: Measure) -> torch.Tensor:
    """CALM's per-token confidence at one layer, ``[R]`` in [0, 1] (higher: more sure).

    ``softmax``: the top probability; ``margin``: top-1 minus top-2 probability; ``state``: cosine similarity
    of this layer's and the previous layer's hidden state (saturation; needs no head), mapped to (1 + cos) / 2.
    """
    if measure == "state":
        return (1 + F.cosine_similarity(hidden.float(), previous.float(), dim=-1)) / 2
    probs = logits.float().softmax(-1)
    if measure == "softmax":
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@dataclass
class DynamicGeneration(Generation):
    """A :class:`Generation` plus ``layers``: ``[B, max_new_tokens]`` exit layer of each token (0 after EOS),
    ``full_from``: the step from which it decoded at full depth because the dynamic steps were slower (None: never;
    ``generation.fallback``), and ``checks``: the layers it checked (``generation.schedule``; none: full depth)."""

    layers: torch.Tensor | None = None
    full_from: int | None = None
    checks: tuple[int, ...] = ()


def decide(hidden: torch.Tensor, exited: torch.Tensor, state: torch.Tensor, layer: torch.Tensor, at: torch.Tensor,
           limit: torch.Tensor, measure: Measure, final: bool = False, *, delta: torch.Tensor | None = None,
           out: torch.Tensor | None = None, logits: torch.Tensor | None = None, previous: torch.Tensor | None = None,
           read: torch.Tensor | None = None, adapted: torch.Tensor | None = None, chosen: torch.Tensor | None = None,
           weight: torch.Tensor | None = None, offset: torch.Tensor | None = None, ended: torch.Tensor | None = None,
           flags: torch.Tensor | None = None, stash: torch.Tensor | None = None,
           pending: torch.Tensor | None = None) -> None:
    """One check layer's decisions, in place: rows not yet ``exited`` whose confidence reaches ``limit`` (all of them
    when ``final``) exit here. A pure function of tensors, so that one compiled version serves every check layer and
    threshold (the layer and the threshold are data), and the learned measure's check is one or two kernels.

    Args:
        hidden: ``[R, 1, D]`` this layer's output at the deciding position (plus ``delta``: the blocks' pending residual
            add, :func:`~earlyexit.engine.fast.block_forward`); ``out``: where the output is also written (the next
            blocks' input); ``previous``: this layer's input (``state``).
        exited, state, layer: the step's exits so far (``[R]`` bool, ``[R, 1, D]``, ``[R]`` long), updated: an exiting
            row's state becomes ``hidden`` and its layer ``at``.
        at: this layer (0-d long); limit: the threshold (0-d float).
        measure, final: :func:`confidence`'s measure; the last layer (every row left exits).
        logits: ``[R, V]`` float, what this exit's head gives (``softmax``, ``margin``); the exiting rows' argmax goes
            to ``chosen``.
        read, adapted: what this exit's head reads (through its adapter or the shared exit block; None: ``hidden``) and
            where an exiting row keeps it (None: not kept here).
        weight, offset: the learned measure's probe at this layer (``[D]``, 0-d).
        ended, flags, stash: a skipping step's: rows whose answer has ended; ``flags`` ``[2]`` gets [every row out or
            ended, a running row exited here]; ``stash`` ``[R, 1, D]`` gets each row's input to the shared exit
            block here (its exit state once it has exited).
        pending: ``[R, 1, D]``: where ``delta`` is kept for the next blocks, which fuse it with their first norm as
            every block does (``out`` then gets ``hidden`` before the add; zeros here without a ``delta``).
    """
    residual = hidden
    if delta is not None:
        hidden = hidden + delta
    if out is not None and pending is not None:
        out.copy_(residual)
        pending.copy_(delta if delta is not None else torch.zeros_like(pending))
    elif out is not None:
        out.copy_(hidden)
    if final:
        now = ~exited
    else:
        if measure == "learned":
            sure = torch.sigmoid(features(hidden[:, -1]) @ weight + offset)
        else:
            sure = confidence(logits, hidden[:, -1], None if previous is None else previous[:, -1], measure)
        now = ~exited & (sure >= limit)
        if logits is not None and chosen is not None:  # a step that ends here needs no other head
            chosen.copy_(torch.where(now, logits.argmax(-1), chosen))
    pick = now[:, None, None]
    state.copy_(torch.where(pick, hidden, state))
    if adapted is not None:
        adapted.copy_(torch.where(pick, hidden if read is None else read, adapted))
    layer.copy_(torch.where(now, at, layer))
    gone = exited | now
    exited.copy_(gone)
    if stash is not None:
        stash.copy_(torch.where(gone[:, None, None], state, hidden))
    if flags is not None:
        flags.copy_(torch.stack([(gone | ended).all(), (now & ~ended).any()]))


class _Exits:
    """One decode step's exits, in buffers updated in place (so that separately captured graphs share them):
    each row's exit ``state`` (the raw block output the blocks above take), its ``adapted`` state (what the head
    reads), whether it has ``exited`` and at which layer; the threshold as data."""

    def __init__(self, core: Core, rows: int, threshold: float, measure: Measure, banned: torch.Tensor,
                 probe: ExitProbe | None = None):
        width = core.ee.config.hidden_size
        self.core, self.measure, self.banned, self.probe = core, measure, banned, probe
        self.state = torch.zeros(rows, 1, width, dtype=core.dtype, device=core.device)
        self.adapted = torch.zeros_like(self.state)
        self.exited = torch.zeros(rows, dtype=torch.bool, device=core.device)
        self.layer = torch.zeros(rows, dtype=torch.long, device=core.device)
        self.chosen = torch.zeros(rows, dtype=torch.long, device=core.device)  # a head measure's token at the exit
        self.limit = torch.tensor(threshold, dtype=torch.float32, device=core.device)
        self.layers = torch.arange(core.n_layers + 1, device=core.device)  # each layer as data: self.layers[l]

    def reset(self) -> None:
        self.exited.zero_()
        self.layer.zero_()

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block's inputs: the exit state for rows that have exited (one token a row)."""
        return torch.where(self.exited[:, None, None], self.state, hidden)

    def decide(self, layer: int, last: torch.Tensor, previous: torch.Tensor | None, final: bool,
               read: torch.Tensor | None = None, adapt: bool = True, run=decide, logits=None, delta=None, **program) -> None:
        """:func:`decide` at ``layer`` (through ``run``: it or its compiled version) on these buffers. last, previous:
        ``[R, 1, D]`` this layer's output (plus ``delta``) and input at the deciding position; ``read``: what exit
        ``layer``'s head reads there when the shared exit block computed it (else its adapter is applied here, if it has
        one); ``adapt`` False: the exiting rows' read is not kept (the learned measure's deferred shared block keeps it);
        ``logits``: the head's function (default: the engine's eager one); ``program``: ``out``, ``ended``, ``flags``,
        ``stash``."""
        adapters = self.core.ee.adapters
        if adapt and read is None and adapters is not None and adapters.has_map(layer):
            if delta is not None:
                last, delta = last + delta, None
            read = adapters(last, layer)
        scores = weight = offset = None
        if not final and self.measure in ("softmax", "margin"):
            if delta is not None:
                last, delta = last + delta, None
            scores = (logits or self.core._logits)((last if read is None else read)[:, -1], self.banned)
        if not final and self.measure == "learned":
            i = self.probe.index[layer]
            weight, offset = self.probe.weight[i], self.probe.bias[i]
        run(last, self.exited, self.state, self.layer, self.layers[layer], self.limit, self.measure, final, delta=delta,
            logits=scores, previous=previous, read=read, adapted=self.adapted if adapt and adapters is not None else None,
            chosen=self.chosen, weight=weight, offset=offset, **program)

    def reads(self) -> torch.Tensor:
        """``[R, 1, D]`` what each row's exit head reads: its adapted state, or its exit state without adapters."""
        return self.adapted if self.core.ee.adapters is not None else self.state

    def token(self) -> torch.Tensor:
        """``[R]`` the greedy token of each row's exit state."""
        return self.core._logits(self.reads()[:, -1], self.banned).argmax(-1)


class DynamicExits(Core):
    """The engine's dynamic-exit mode (mixed into :class:`earlyexit.engine.Engine`)."""

    @torch.no_grad()
    def generate_dynamic(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation: GenerationArgs | None = None,
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
        **changes,
    ) -> DynamicGeneration:
        """Greedy decoding where each token exits at the first check layer whose :func:`confidence` reaches
        ``threshold`` (the last layer always exits).

        The prompt runs at full depth. Skipped layers' keys and values come from the exit state (CALM's
        propagation). On the fast path the blocks above the layer where a step's last row exits do not run (only
        their K/V projections of the exit states do); elsewhere they run with the exit state as input (see the
        module docstring).

        Args:
            input_ids, attention_mask: ``[B, T]`` left-padded prompts.
            generation: the options; ``threshold``, ``min_layer`` (default N/4), ``check_every`` (or ``check_layers``),
                ``measure`` and ``max_new_tokens`` are read (decoding is greedy). Keyword ``changes`` override single fields.
            eos_token_id, pad_token_id, ignore_eos: as :meth:`Core.generate`.
            calibration: ``(input_ids, attention_mask)`` prompts to choose the check layers on
                (``generation.schedule auto``; default: these prompts), at the first call of a setting and batch size.
        """
        args = options(generation, **changes)
        self._fast_shared_only("dynamic exits")
        self.ee.check_layer(args.min_layer_of(self.n_layers))
        checks = tuple(args.check_layers_of(self.n_layers))
        stops = self.stops(eos_token_id, pad_token_id, ignore_eos)
        ids, mask = self._shape(input_ids, attention_mask)
        if args.measure == "learned":
            self._probe(args.probe, checks)  # refused before anything runs unless fitted at every check layer
        if self.schedules(args):  # the subset of the check layers that runs fastest here (none: full depth)
            key = ("dynamic", args.threshold, checks, args.measure, args.probe, ids.shape[0], args.max_new_tokens, stops,
                   args.decide, args.fallback)
            subsets = [()] + [s for size in range(1, len(checks) + 1) for s in itertools.combinations(checks, size)]
            if len(checks) > SUBSETS_OF:
                subsets = [(), *[(layer,) for layer in checks], checks]
            checks = self._fastest(key, subsets, lambda subset, i, m: self._dynamic(i, m, args, subset, stops),
                                   lambda: self._calibration(calibration, ids, mask))
            out = self._dynamic(ids, mask, args, checks, stops)
            self._observe(key, out.full_from is not None, ())  # a choice that keeps falling back runs full depth
            return out
        return self._dynamic(ids, mask, args, checks, stops)

    def _dynamic(self, ids, mask, args: GenerationArgs, checks: tuple[int, ...], stops: Stops) -> DynamicGeneration:
        """:meth:`generate_dynamic` at exactly ``checks`` (none: full depth) on prompts already on the device."""
        batch, prompt = ids.shape
        n = self.n_layers
        if not checks:
            out = self._exits_run(ids, mask, [n], args, stops)[n]
            layers = torch.where(torch.arange(args.max_new_tokens, device=out.tokens.device)[None] < out.n_tokens[:, None], n, 0)
            return DynamicGeneration(out.tokens, out.n_tokens, out.finished, layers, None, ())
        probe = self._probe(args.probe, checks) if args.measure == "learned" else None
        key = ("dynamic", args.threshold, checks, args.measure, args.probe, batch, prompt, args.max_new_tokens, stops,
               args.decide, args.fallback)
        if self.fast is not None:
            program = self._program(key, lambda: self._skipping_program(args, checks, batch, prompt, stops, probe))
        else:
            program = self._program(key, lambda: self._propagating_program(args.threshold, checks, args.measure, batch, prompt,
                                                                           args.max_new_tokens, stops, probe))
        out, used, switched = program(ids, mask)
        result = stops.finish(out, args.max_new_tokens)
        steps = torch.arange(args.max_new_tokens, device=out.device)[None, :]
        layers = torch.where(steps < result.n_tokens[:, None], used, 0)
        return DynamicGeneration(result.tokens, result.n_tokens, result.finished, layers, switched, checks)

    def _fuses(self, args: GenerationArgs) -> bool:
        """Whether a skipping step takes the Triton kernels of :mod:`earlyexit.engine.check`: on a GPU with CUDA graphs
        where the device decides (in host-decided pieces the fused check measured slower)."""
        return self.cuda_graphs and fused_check_runs(self.device) and resolve(args.decide, self.nodes)[0] == "device"

    def _probe(self, directory: str, checks: tuple[int, ...]) -> ExitProbe:
        """The exit probe saved in ``directory`` on this engine's device (loaded once), refused unless it was fitted
        at every check layer."""
        probe = self._probes.get(directory)
        if probe is None:
            probe = self._probes[directory] = ExitProbe.load(directory, self.ee.config.hidden_size).to(self.device)
        probe.require(list(checks), directory)
        return probe

    def _start(self, exits: _Exits, checks: tuple[int, ...], loop: Columns, ids, valid, npad, cache) -> None:
        """Start ``loop`` with the prompt's answer: the prompt runs at full depth (every block, every position), its
        last position picks its exit, and column 0 gets that token and its layer."""
        batch, prompt = ids.shape
        loop.start(prompt)
        slots = torch.arange(prompt, device=self.device).expand(batch, -1)
        hidden, kwargs, masks = self._inputs(ids, slots, valid, npad, cache)
        exits.reset()
        for layer in range(1, self.n_layers + 1):
            inputs = hidden
            hidden = self._blocks(inputs, kwargs, masks, range(layer, layer + 1))
            if layer in checks or layer == self.n_layers:
                adapted = self._shared_check(hidden, kwargs, masks, layer)  # every prompt position: its cache
                exits.decide(layer, hidden[:, -1:], inputs[:, -1:], final=layer == self.n_layers,
                             read=None if adapted is None else adapted[:, -1:])
        loop.out[:, 0] = exits.token()
        loop.extras[0][:, 0] = exits.layer

    def _shared_check(self, hidden, kwargs, masks, layer: int) -> torch.Tensor | None:
        """At a check layer read through the shared exit block: the block on ``hidden`` (which writes its cache), else
        None."""
        if self.shared is None or not self.ee.adapters.has_block(layer):
            return None
        return self._shared_block(hidden, kwargs, masks, [(layer, hidden.shape[0])])

    def _propagating_program(self, threshold: float, checks: tuple[int, ...], measure: Measure, batch: int, prompt: int,
                             max_new_tokens: int, stops: Stops, probe: ExitProbe | None):
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + max_new_tokens)
        banned, ends = stops.tensors(self.device)
        loop = Columns(batch, max_new_tokens, stops.pad, self.device, extras=1)
        used = loop.extras[0]
        exits = _Exits(self, batch, threshold, measure, banned, probe)
        graphed = None

        def step():
            hidden, kwargs, masks = self._decode_inputs(loop.last(), loop.slot, valid, npad, cache)
            exits.reset()
            for layer in range(1, self.n_layers + 1):
                inputs = exits.inputs(hidden)
                hidden = self._decode_blocks(inputs, kwargs, masks, range(layer, layer + 1))
                if layer in checks or layer == self.n_layers:
                    # exited rows feed the shared block their exit state, as the blocks above them
                    adapted = self._shared_check(exits.inputs(hidden), kwargs, masks, layer)
                    exits.decide(layer, hidden, inputs, final=layer == self.n_layers, read=adapted)
            token = exits.token()
            loop.advance(token, exits.layer)
            return token

        state = loop.state() + [exits.exited, exits.layer, exits.state, exits.adapted]
        start = self._prompt_pass(lambda ids: self._start(exits, checks, loop, ids, valid, npad, cache), (batch, prompt), state)

        def run(ids, mask):
            nonlocal graphed
            start(load(ids, mask))
            if graphed is None:
                graphed = self._graph(step, state)
            until_done(graphed, loop.out, ends)
            return loop.out.clone(), used.clone(), None

        return run

    def _skipping_program(self, args: GenerationArgs, checks: tuple[int, ...], batch: int, prompt: int, stops: Stops,
                          probe: ExitProbe | None):
        threshold, measure, max_new_tokens = args.threshold, args.measure, args.max_new_tokens
        n, p, fill = self.n_layers, len(checks), self.kv_fill
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + max_new_tokens)
        cache.stack(list(range(n)), batch, fill.kv_heads, fill.head_dim, self.dtype, self.device)  # for the K/V fill
        through = [layer for layer in checks if self.shared is not None and self.ee.adapters.has_block(layer)]
        if through:  # the shared exit block's cache layers at its checks, filled together too
            cache.stack([n + layer for layer in through], batch, self.shared.kv_heads, self.shared.head_dim,
                        self.shared.dtype, self.device)
        banned, ends = stops.tensors(self.device)
        loop = Columns(batch, max_new_tokens, stops.pad, self.device, extras=1)
        used = loop.extras[0]
        exits = _Exits(self, batch, threshold, measure, banned, probe)
        # the step's inputs, written by its first piece and read by the others
        width = self.ee.config.hidden_size
        hidden = torch.zeros(batch, 1, width, dtype=self.dtype, device=self.device)
        rotary = tuple(torch.zeros(batch, 1, fill.head_dim, dtype=self.dtype, device=self.device) for _ in range(2))
        masks = {w: torch.zeros(batch, 1, 1, valid.shape[1], dtype=self.dtype, device=self.device) for w in dict.fromkeys(self.windows)}
        kwargs = {"position_embeddings": rotary, self._cache_name: cache}
        # the learned measure's checks leave the last block's residual add pending (``carried``): the next piece's first
        # block fuses it with its norm, as in full depth, instead of a separately compiled block on a settled input
        carried = torch.zeros_like(hidden) if measure == "learned" else None
        ended = torch.zeros(batch, dtype=torch.bool, device=self.device)  # rows whose answer has ended (EOS written)
        # after check j: [every row has exited or ended, a running row exited here (its shared exit block is to run)]
        flags = torch.zeros(max(p, 1), 2, dtype=torch.bool, device=self.device)
        bounds = [0, *checks, n]  # piece j runs blocks bounds[j] + 1 .. bounds[j + 1]
        head_measure = measure in ("softmax", "margin")  # the check computed each exiting row's token
        state_measure = measure == "state"
        check = self._compiled(decide)
        # learned and final decisions, a skip's waiting position and the step's last bookkeeping as one kernel each
        # (check.py) where the device decides: the check measured faster there, and slower in host-decided pieces
        fused = self._fuses(args)
        if fused:
            check = fused_decide(check)
        # the learned measure decides before the shared exit block runs: only rows that exit run it (see adapt), and the
        # block's keys and values at the checks passed come from their inputs (stash), in one product a step
        stashed = through if measure == "learned" else []
        stash = torch.zeros(len(stashed), batch, 1, width, dtype=self.dtype, device=self.device)
        # deferred K/V: a step every row of which exits at a check leaves the blocks above unfilled for its position; the
        # positions wait here (at most DEFER of them) until a token runs those blocks, or the host's next flush
        trash = cache.capacity - 1  # no token is fed there: where a flush writes what is not due
        waiting = torch.zeros(batch, DEFER, width, dtype=self.dtype, device=self.device)  # their exit states
        waiting_rotary = tuple(torch.zeros(batch, DEFER, fill.head_dim, dtype=self.dtype, device=self.device) for _ in range(2))
        waiting_slot = torch.full((batch, DEFER), trash, dtype=torch.long, device=self.device)
        waiting_from = torch.zeros(DEFER, dtype=torch.long, device=self.device)  # the check they left at (0: none)
        pending = torch.zeros((), dtype=torch.bool, device=self.device)
        span = exits.layers[bounds[1] + 1 :] if p else exits.layers[:0]  # the blocks a flush may fill
        shared_span = exits.layers[torch.tensor(through, device=self.device)] if through else None
        defer = fused_wait if fused else self._compiled(wait)
        # one row: a piece above a check runs only while the row has not exited, so nothing is held, and its blocks are
        # the compiled graphs full depth runs (the held variant is another graph, with a select in every block)
        hold = batch > 1

        def begin():
            targets = [hidden, *rotary, *masks.values()]
            self._decode_inputs_into(loop.out, loop.step, loop.slot, valid, npad, cache, targets, [exits.exited, exits.layer])

        def finish(token: torch.Tensor | None = None, kv: int | None = None):
            """The shared exit block's keys and values at the first ``kv`` stashed checks (all: None), the step's token,
            the next column."""
            count = len(stashed) if kv is None else kv
            if count:
                self._shared_kv(stash[:count], rotary, cache, stashed[:count])
            if token is None:
                token = self._decode_greedy(exits.reads()[:, -1], [(n, batch)], banned)
            if fused:
                fused_advance(loop.out, used, loop.step, loop.slot, token, exits.layer, ended, ends)
                return
            loop.advance(token, exits.layer)
            if ends is not None:
                ended.logical_or_(torch.isin(token, ends))

        def piece(j: int):
            top = bounds[j + 1]

            def run():  # blocks bounds[j] + 1 .. top, exited rows held at their exit state, then the check at top
                if j == 0:
                    begin()
                out = self._decode_blocks(hidden, kwargs, masks, range(bounds[j] + 1, top + 1),
                                          hold=(exits.exited, exits.state) if hold and j else None, previous=state_measure,
                                          pair=True, delta=carried if j else None)
                (h, delta), inputs = out if state_measure else (out, None)
                if j == p:
                    exits.decide(n, h, inputs, final=True, run=check, delta=delta)
                    finish()
                    return
                read = None
                if top in through and top not in stashed:  # the head reads the exit through the shared block
                    h, delta = h + delta, None
                    read = self._shared_block(exits.inputs(h), kwargs, masks, [(top, batch)], self._run_block)
                exits.decide(top, h, inputs, final=False, read=read, adapt=top not in stashed, run=check, delta=delta,
                             logits=self._decode_logits, ended=ended, flags=flags[j],
                             stash=stash[stashed.index(top)] if top in stashed else None,
                             out=None if state_measure else hidden, pending=carried)
                if state_measure:  # its input may be the buffer hidden itself: written last
                    hidden.copy_(h if delta is None else h + delta)

            run.label = f"blocks {bounds[j] + 1}-{top}" + (", token" if j == p else f", check {top}")
            return run

        def adapt(j: int):
            top = bounds[j + 1]

            def run():  # the rows that exited at top read it through the shared exit block (which rewrites its K/V there)
                # rows still running pass hidden without its carried add: their output here is dropped, and their keys
                # and values at this exit are rewritten from the stash when the step finishes
                adapted = self._shared_block(exits.inputs(hidden), kwargs, masks, [(top, batch)], self._run_block)
                exits.adapted.copy_(torch.where((exits.layer == top)[:, None, None], adapted, exits.adapted))

            run.label = f"shared block at {top}"
            return run

        def skip(j: int):
            top = bounds[j + 1]
            below = sum(layer < top for layer in stashed)  # the stashed checks passed: their K/V now; those above wait

            def run():  # every row has exited at or below top: the blocks above wait for their K/V; the token
                defer(waiting, *waiting_rotary, waiting_slot, waiting_from, pending, exits.state, *rotary, loop.slot,
                      loop.step, exits.layers[top], DEFER)
                finish(exits.chosen if head_measure else None, kv=below)

            run.label = f"skip {top + 1}-{n}, token"
            return run

        def flush():  # the waiting positions' K/V of the blocks above their exits, in one batched product
            due = (waiting_from > 0)[None, :] & (span[:, None] > waiting_from[None, :])  # [L, DEFER]
            self.kv_fill(waiting, waiting_rotary, cache, bounds[1] + 1, n, self._run_kv,
                         slots=torch.where(due[:, None, :], waiting_slot[None], trash))  # [L, R, DEFER]: the rest: trash
            if through:  # and the shared exit block's at its checks above them
                due = (waiting_from > 0)[None, :] & (shared_span[:, None] > waiting_from[None, :])
                self._shared_kv(waiting[None], waiting_rotary, cache, through,
                                slots=torch.where(due[:, None, :], waiting_slot[None], trash))
            waiting_from.zero_()
            pending.fill_(False)

        flush.label = f"fill {bounds[1] + 1}-{n} of waiting positions" if p else "flush"
        flushed = Branch(pending, flush)
        adapts = {j: adapt(j) for j, layer in enumerate(checks) if layer in stashed}
        skips = [skip(j) for j in range(p)]

        def plan(j: int):
            """Piece j, then: every row out → skip (after the deferred shared block), else the pieces above."""
            if j == p:
                return [piece(p)]
            above = plan(j + 1)
            if j in adapts and batch > 1:  # one row: a row out here is every row out
                above = [Branch(flags[j, 1], adapts[j]), above]
            if j == 0:  # a token that goes on past the first check needs every position's K/V above it
                above = [flushed, above]
            done = [adapts[j], skips[j]] if j in adapts else skips[j]
            return [piece(j), Branch(flags[j, 0], done, above)]

        deepest = torch.full((batch,), n, dtype=torch.long, device=self.device)

        def full():  # the fallback: full depth's own step (the deferred K/V were filled when it took over)
            h, kw, mk = self._decode_inputs(loop.last(), loop.slot, valid, npad, cache)
            h = self._decode_blocks(h, kw, mk, range(1, n + 1))
            loop.advance(self._decode_greedy(h[:, -1], [(n, batch)], banned), deepest)

        full.label = f"full depth ({n} blocks), token"
        state = loop.state() + [exits.exited, exits.layer, exits.state, exits.adapted, exits.chosen, hidden, *rotary, ended,
                                flags, stash, *masks.values(), waiting, *waiting_rotary, waiting_slot, waiting_from, pending,
                                *([] if carried is None else [carried])]

        def first(ids):
            self._start(exits, checks, loop, ids, valid, npad, cache)
            ended.copy_(torch.isin(loop.out[:, 0], ends) if ends is not None else torch.zeros_like(ended))
            waiting_from.zero_()
            pending.fill_(False)

        start = self._prompt_pass(first, (batch, prompt), state)
        steps = {}  # the step and its fallback, built (captured, on a GPU) at the first call

        def run(ids, mask):
            start(load(ids, mask))
            if not steps:
                steps["dynamic"] = self._stepper(plan(0), state, args.decide)
                steps["flush"] = self._stepper(flushed, state, args.decide)
                if self.falls_back(args) and max_new_tokens > 4:
                    step = self._graph(full, state)
                    steps["full"] = (step, self._time(step, state, repeats=min(10, max_new_tokens - 3)))
            switched = until_done(steps["dynamic"], loop.out, ends, steps.get("full"), steps["flush"])
            return loop.out.clone(), used.clone(), switched

        return run


def wait(waiting: torch.Tensor, waiting_cos: torch.Tensor, waiting_sin: torch.Tensor, waiting_slot: torch.Tensor,
         waiting_from: torch.Tensor, pending: torch.Tensor, state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         slot: torch.Tensor, step: torch.Tensor, at: torch.Tensor, defer: int) -> None:
    """Keep a skipped step's position waiting for its K/V above layer ``at``: its exit ``state`` ``[R, 1, D]``, rotary
    ``cos``/``sin`` ``[R, 1, d]`` and ``slot`` ``[R, 1]``, in entry ``step % defer`` of the waiting buffers."""
    i = (step % defer).view(1)
    waiting.index_copy_(1, i, state)
    waiting_cos.index_copy_(1, i, cos)
    waiting_sin.index_copy_(1, i, sin)
    waiting_slot.index_copy_(1, i, slot)
    waiting_from.index_copy_(0, i, at.view(1))
    pending.fill_(True)
