"""Dynamic early exits (CALM, Schuster et al., 2022): each token stops at the first confident layer.

A token exits at the first check layer (``min_layer``, ``min_layer + check_every``, …, or the ``check_layers``
listed) whose :func:`confidence` reaches the threshold; the last layer always exits. Tokens after it still need keys
and values at the layers it skipped: its exit state is propagated upwards (CALM's choice), i.e. every block above
the exit takes the exit hidden state as that token's input, so its keys and values there are the K/V projections of
that state.

Two ways to run the same rule:

* **skipping** (the fast path of llama-style families): the step is a plan (:mod:`earlyexit.engine.control`) cut at
  the check layers. After each, a flag says whether every row of the batch has exited (or has already ended its
  answer); if so the blocks above are not run, only their K/V projections of the exit state are written to the cache
  (:class:`~earlyexit.engine.fast.KVFill`: one batched product for all of them, about a sixth of a block's weights
  each for SmolLM2, a third for Llama-2-7B); with a head measure the step's token is the one the check chose. On a GPU the
  whole step is one CUDA graph whose branches are conditional nodes (``generation.decide device``), or a graph per
  piece with the host reading each flag (``host``: a synchronisation per check). With the ``learned`` measure (:mod:`earlyexit.probe`) a check
  reads a probe instead of the head, and the shared exit block runs only for rows that exit there (it then writes
  just its keys and values for the others).
* **propagating** (other families, the model's own blocks): every block still runs for every token, the exited rows
  taking their exit state as input; one CUDA graph per step. It measures quality against depth, not time.

A batch skips only above the layer where its *last* row exits: rows that exited earlier ride along (their inputs
held at their exit state) until then. Letting them leave the batch instead (gathering the running rows, a program
per row count) was built and measured slower on SmolLM2 at batch 8 (0.63× full depth against 0.78×): a decode step
of a small model costs the same for 4 rows as for 8, so fewer rows save nothing while the gathers and the extra
fills cost launches (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from earlyexit.engine.control import Branch
from earlyexit.engine.core import Columns, Core, Stops, until_done
from earlyexit.generation import GenerationArgs, Measure, options
from earlyexit.model import Generation
from earlyexit.probe import ExitProbe


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
    """A :class:`Generation` plus ``layers``: ``[B, max_new_tokens]`` exit layer of each token (0 after EOS), and
    ``full_from``: the step from which it decoded at full depth because the dynamic steps were slower (None: never;
    ``generation.fallback``)."""

    layers: torch.Tensor | None = None
    full_from: int | None = None


class _Exits:
    """One decode step's exits, in buffers updated in place (so that separately captured graphs share them):
    each row's exit ``state`` (the raw block output the blocks above take), its ``adapted`` state (what the head
    reads), whether it has ``exited`` and at which layer."""

    def __init__(self, core: Core, rows: int, threshold: float, measure: Measure, banned: torch.Tensor,
                 probe: ExitProbe | None = None):
        width = core.ee.config.hidden_size
        self.core, self.threshold, self.measure, self.banned, self.probe = core, threshold, measure, banned, probe
        self.state = torch.zeros(rows, 1, width, dtype=core.dtype, device=core.device)
        self.adapted = torch.zeros_like(self.state)
        self.exited = torch.zeros(rows, dtype=torch.bool, device=core.device)
        self.layer = torch.zeros(rows, dtype=torch.long, device=core.device)
        self.chosen = torch.zeros(rows, dtype=torch.long, device=core.device)  # a head measure's token at the exit

    def reset(self) -> None:
        self.exited.zero_()
        self.layer.zero_()

    def inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """A block's inputs: the exit state for rows that have exited (one token a row)."""
        return torch.where(self.exited[:, None, None], self.state, hidden)

    def decide(self, layer: int, last: torch.Tensor, previous: torch.Tensor, final: bool,
               adapted: torch.Tensor | None = None) -> None:
        """Rows not yet exited whose confidence at ``layer`` reaches the threshold (all of them at the last layer)
        exit here. last, previous: ``[R, 1, D]`` this layer's output and input at the deciding position; ``adapted``:
        what exit ``layer``'s head reads there, when the shared exit block computed it (else its adapter, here)."""
        if adapted is None and self.core.ee.adapters is not None:
            adapted = self.core._adapt(last, [(layer, last.shape[0])])
        if final:
            now = ~self.exited
        elif self.measure == "learned":
            now = ~self.exited & (self.probe(last[:, -1], layer) >= self.threshold)
        else:
            logits = None if self.measure == "state" else self.core._logits(last if adapted is None else adapted, self.banned)
            now = ~self.exited & (confidence(logits, last, previous, self.measure)[:, 0] >= self.threshold)
            if logits is not None:  # the exiting rows' tokens: a step that ends here needs no other head
                self.chosen.copy_(torch.where(now, logits[:, -1].argmax(-1), self.chosen))
        pick = now[:, None, None]
        self.state.copy_(torch.where(pick, last, self.state))
        if adapted is not None:
            self.adapted.copy_(torch.where(pick, adapted, self.adapted))
        self.layer.copy_(torch.where(now, layer, self.layer))
        self.exited.copy_(self.exited | now)

    def token(self) -> torch.Tensor:
        """``[R]`` the greedy token of each row's exit state."""
        states = self.adapted if self.core.ee.adapters is not None else self.state
        return self.core._logits(states[:, -1], self.banned).argmax(-1)


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
        """
        args = options(generation, **changes)
        self.ee.check_layer(args.min_layer_of(self.n_layers))
        checks = tuple(args.check_layers_of(self.n_layers))
        stops = self.stops(eos_token_id, pad_token_id, ignore_eos)
        ids, mask = self._shape(input_ids, attention_mask)
        batch, prompt = ids.shape
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
        return DynamicGeneration(result.tokens, result.n_tokens, result.finished, layers, switched)

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
                             adapted=None if adapted is None else adapted[:, -1:])
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
                    exits.decide(layer, hidden, inputs, final=layer == self.n_layers, adapted=adapted)
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
        n, p = self.n_layers, len(checks)
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + max_new_tokens)
        cache.stack(n, batch, self.kv_fill.kv_heads, self.kv_fill.head_dim, self.dtype, self.device)  # for kv_fill
        banned, ends = stops.tensors(self.device)
        loop = Columns(batch, max_new_tokens, stops.pad, self.device, extras=1)
        used = loop.extras[0]
        exits = _Exits(self, batch, threshold, measure, banned, probe)
        # the step's inputs, written by its first piece and read by the others
        hidden = torch.zeros(batch, 1, self.ee.config.hidden_size, dtype=self.dtype, device=self.device)
        rotary = tuple(torch.zeros(batch, 1, self.kv_fill.head_dim, dtype=self.dtype, device=self.device) for _ in range(2))
        masks = {w: torch.zeros(batch, 1, 1, valid.shape[1], dtype=self.dtype, device=self.device) for w in dict.fromkeys(self.windows)}
        kwargs = {"position_embeddings": rotary, self._cache_name: cache}
        ended = torch.zeros(batch, dtype=torch.bool, device=self.device)  # rows whose answer has ended (EOS written)
        # after check j: [every row has exited or ended, a row exited here whose shared exit block is still to run]
        flags = torch.zeros(max(p, 1), 2, dtype=torch.bool, device=self.device)
        bounds = [0, *checks, n]  # piece j runs blocks bounds[j] + 1 .. bounds[j + 1]
        columns = torch.arange(max_new_tokens, device=self.device)
        head_measure = measure in ("softmax", "margin")  # the check computed each exiting row's token

        def deferred(layer: int) -> bool:
            """The learned measure decides before the shared exit block runs: only rows that exit run it (see adapt)."""
            return measure == "learned" and self.shared is not None and self.ee.adapters.has_block(layer)

        def begin():
            h, kw, mk = self._decode_inputs(loop.last(), loop.slot, valid, npad, cache)
            hidden.copy_(h)
            for buffer, value in zip(rotary, kw["position_embeddings"]):
                buffer.copy_(value)
            for window, buffer in masks.items():
                buffer.copy_(mk[window])
            exits.reset()
            if ends is not None:
                ended.copy_((torch.isin(loop.out, ends) & (columns <= loop.step)).any(1))

        def blocks(j: int):
            """Blocks bounds[j] + 1 .. bounds[j + 1] on the step's state, exited rows held at their exit state."""
            h = inputs = hidden
            for layer in range(bounds[j] + 1, bounds[j + 1] + 1):
                inputs = exits.inputs(h)
                h = self._decode_blocks(inputs, kwargs, masks, range(layer, layer + 1))
            return h, inputs

        def check(j: int):
            top = bounds[j + 1]

            def run(h, inputs):  # the decisions at check layer top and the flags the branches after it read
                if deferred(top):  # the probe reads the raw state; the shared block only writes its keys and values
                    exits.decide(top, h, inputs, final=False)
                    self._shared_fill(exits.inputs(h), rotary, cache, top)
                else:
                    adapted = self._shared_check(exits.inputs(h), kwargs, masks, top)
                    exits.decide(top, h, inputs, final=False, adapted=adapted)
                hidden.copy_(h)
                new = ((exits.layer == top) & ~ended).any() if deferred(top) else ended.new_zeros(())
                flags[j].copy_(torch.stack([(exits.exited | ended).all(), new]))

            return self._compiled(run)

        checked = [check(j) for j in range(p)]

        def piece(j: int):
            def run():
                if j == 0:
                    begin()
                h, inputs = blocks(j)
                if j < p:
                    checked[j](h, inputs)
                    return
                adapted = self._shared_check(exits.inputs(h), kwargs, masks, n)
                exits.decide(n, h, inputs, final=True, adapted=adapted)
                loop.advance(exits.token(), exits.layer)

            return run

        def adapt(j: int):
            # the rows that exited at bounds[j + 1] read it through the shared exit block, which rewrites the keys and
            # values the piece wrote there (the same ones)
            def run():
                top = bounds[j + 1]
                adapted = self._shared_block(exits.inputs(hidden), kwargs, masks, [(top, batch)])
                exits.adapted.copy_(torch.where((exits.layer == top)[:, None, None], adapted, exits.adapted))

            return self._compiled(run)

        def fill(j: int):
            def run():  # every row has exited at or below bounds[j + 1]: only the K/V of the blocks above, then the token
                self.kv_fill(exits.state, rotary, cache, bounds[j + 1] + 1, n)
                for layer in checks[j + 1 :]:
                    if self.shared is not None and self.ee.adapters.has_block(layer):
                        self._shared_fill(exits.state, rotary, cache, layer)
                loop.advance(exits.chosen if head_measure else exits.token(), exits.layer)

            return self._compiled(run)

        adapts = {j: adapt(j) for j, layer in enumerate(checks) if deferred(layer)}
        fills = [fill(j) for j in range(p)]

        def plan(j: int):
            """Piece j, then: every row out → fill j (after the deferred shared block), else the pieces above."""
            if j == p:
                return [piece(p)]
            above = [Branch(flags[j, 1], adapts[j]), plan(j + 1)] if j in adapts else plan(j + 1)
            done = [adapts[j], fills[j]] if j in adapts else fills[j]
            return [piece(j), Branch(flags[j, 0], done, above)]

        def full():  # the fallback: every block for every row, the last layer's token
            begin()
            h = self._decode_blocks(hidden, kwargs, masks, range(1, n + 1))
            exits.layer.fill_(n)
            loop.advance(self._decode_greedy(h[:, -1], [(n, batch)], banned), exits.layer)

        state = loop.state() + [exits.exited, exits.layer, exits.state, exits.adapted, exits.chosen, hidden, *rotary, ended,
                                flags, *masks.values()]
        start = self._prompt_pass(lambda ids: self._start(exits, checks, loop, ids, valid, npad, cache), (batch, prompt), state)
        steps = {}  # the step and its fallback, built (captured, on a GPU) at the first call

        def run(ids, mask):
            start(load(ids, mask))
            if not steps:
                steps["dynamic"] = self._stepper(plan(0), state, args.decide)
                if self.cuda_graphs and args.fallback and max_new_tokens > 4:
                    step = self._stepper(full, state, "host")
                    steps["full"] = (step, self._time(step, state, repeats=min(10, max_new_tokens - 3)))
            switched = until_done(steps["dynamic"], loop.out, ends, steps.get("full"))
            return loop.out.clone(), used.clone(), switched

        return run
