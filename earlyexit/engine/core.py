"""The engine's core: the model's own pieces driven step by step, decoding programs, CUDA graphs, all exits.

:class:`Core` drives the decoder blocks itself instead of calling the model's ``generate``. Everything
family-specific stays in the model: the embedding, positional encoding and rotary tables come from the model's
own forward (a pre-hook on block 1 captures the block inputs and stops it there), and the blocks are the model's
own modules, called with the keyword arguments the model itself passes them. We supply the cache
(:class:`~earlyexit.engine.cache.StaticKV`) and the 4D additive attention masks.

A *program* is the work of one shape (rows, prompt length, options): its buffers, cache and, on a GPU, the
decode step captured once as a CUDA graph that advances its own inputs, so a token costs one graph replay and no
Python per layer. Programs are kept and reused by later calls of the same shape.

**All exits in one pass** (:meth:`Core.generate`): K exit layers × B prompts decode as K·B rows of one batch,
ordered by exit (deepest first), so block ``l`` runs on the leading rows whose exit is ≥ ``l``: a slice, never a
mask. A row's hidden state stops changing above its exit and the final norm and head read it there; each layer's
KV cache holds only the rows that reach it. Greedy outputs equal the model's own ``generate`` truncated at each
exit (tests/test_engine.py).
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from earlyexit.adapters import cast_floats
from earlyexit.arch import CACHE_ARGS, FAST_FAMILIES, UNBATCHED_ARGS, sliding_windows
from earlyexit.engine.cache import StaticKV, additive_mask
from earlyexit.engine.control import Nodes, Plan, capture, pieces, resolve, walk
from earlyexit.engine.fast import FusedBlock, block_forward, fast_blocks, fast_inputs, kv_forward
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs, options, select
from earlyexit.model import EarlyExitHead, Generation, finish


class _Stop(Exception):
    """Raised by the block-1 pre-hook once the model's own forward has prepared the block inputs."""


class Core:
    """The engine's machinery and its all-exits mode (see :class:`earlyexit.engine.Engine` for the whole engine).

    Args:
        ee: the exit-aware model (eval mode; merge LoRA adapters first for speed).
        cuda_graphs: capture the decode step as a CUDA graph; default: on when the model is on a GPU.
        compile: run the decode step's blocks and head through ``torch.compile`` (fuses the norms, rotary and
            element-wise work between the matmuls; compiles once per exit set and batch shape).
        compile_mode: how (:attr:`earlyexit.generation.GenerationArgs.compile_mode`).
        nodes: how device-decided steps build their conditional nodes (:mod:`earlyexit.engine.control`): ``auto``,
            ``torch`` or ``driver``.
    """

    def __init__(self, ee: EarlyExitHead, cuda_graphs: bool | None = None, compile: bool = False, fast: bool | None = None,
                 compile_mode: str = "auto", nodes: Nodes = "auto"):
        self.ee = ee
        self.device = next(ee.parameters()).device
        self.dtype = ee.norm.weight.dtype if getattr(ee.norm, "weight", None) is not None else torch.float32
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise EarlyExitError("CUDA graphs need the model on a GPU")
        self._programs: dict[tuple, Callable] = {}
        self._calibrating = 0  # while a schedule is timed: the programs it may hold beyond KEEP_PROGRAMS
        self._probes: dict[str, torch.nn.Module] = {}  # dynamic exits' learned measure: the probes loaded, by directory
        self._schedules: dict[tuple, object] = {}  # what an adaptive setting runs (generation.schedule auto), by setting
        self._fell_back: dict[tuple, collections.deque] = {}  # and whether its fallback took over, its last calls
        self.calibrations: dict[tuple, dict] = {}  # and the seconds each choice took on the calibration prompts
        self.calibration_depths: dict[tuple, dict] = {}  # and a dynamic choice's layers a token there
        self.windows = sliding_windows(ee.config)
        self._layer_types = getattr(ee.config, "layer_types", None) or [None] * ee.n_layers
        self.n_layers = ee.n_layers
        self._signature = inspect.signature(ee.blocks[0].forward)
        params = self._params = self._signature.parameters
        self._hidden_name = next(iter(params))
        self._cache_name = next((name for name in CACHE_ARGS if name in params), None)
        if self._cache_name is None:
            raise EarlyExitError(f"{type(ee.blocks[0]).__name__} takes no cache argument; the engine cannot drive it")
        self.fast = None  # llama-style families: fused blocks (earlyexit/engine/fast.py); others: the model's own blocks
        self.kv_fill = None  # and their keys and values filled together (a dynamic exit skipping blocks)
        if fast is not False:
            fused = fast_blocks(ee)
            if fused is not None:
                self.fast, self.kv_fill = fused
            if fast and self.fast is None:
                raise EarlyExitError(f"no fast path for {ee.config.model_type} blocks: it serves llama-style families "
                                     f"({FAST_FAMILIES})")
        self.shared = None  # the shared exit block (exit adapters of kind block) on the fast path, one per exit's cache
        self.own_shared: dict[int, torch.nn.Module] = {}  # elsewhere: its own module, by exit (each its cache layer)
        adapters = ee.adapters
        if adapters is not None and adapters.block is not None:
            if self.fast is not None:
                self.shared = FusedBlock(adapters.block, ee.config)
            else:
                self.own_shared = {layer: at_cache_layer(adapters.block, self.n_layers + layer)
                                   for layer in adapters.layers if adapters.has_block(layer)}
        self.nodes = nodes
        self._decode_inputs, self._decode_head, self._decode_greedy, self._decode_logits = (
            self._inputs, self._head, self._greedy, self._logits)
        self._decode_inputs_into = self._inputs_into
        self._run_block, self._run_kv = block_forward, kv_forward  # the fast path's pure pieces, compiled or not
        self._compiled: Callable[[Callable], Callable] = lambda fn: fn  # a decode piece's own work, compiled or not
        if compile:  # one compiled version of each piece serves every layer, exit, threshold and setting of the process
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            how = compiler(compile_mode, ee.config.hidden_size)
            self._compiled = lambda fn: compiled(fn, how)
            self._decode_head = self._compiled(self._head)
            self._decode_greedy = self._compiled(self._greedy)
            self._decode_logits = self._compiled(self._logits)
            if self.fast is not None:  # a block at a time: the block's numbers are data, never a layer index
                self._run_block, self._run_kv = self._compiled(block_forward), self._compiled(kv_forward)
                self._decode_inputs = self._compiled(self._inputs)
                self._decode_inputs_into = self._compiled(self._inputs_into)
        if self.fast is not None:
            self._decode_blocks = functools.partial(self._blocks, run=self._run_block)
        else:
            self._decode_blocks = self._compiled(self._blocks)

    # ----------------------------------------------------------------------------------------- model pieces
    def _inputs(self, ids: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, npad: torch.Tensor, cache: StaticKV):
        """The model's own embedding and positional inputs for tokens ``ids`` at ``slots``.

        Returns the hidden state entering block 1, the keyword arguments the model passes its blocks (with
        ``cache``, whose write slots become ``slots``), and one additive mask per distinct sliding window.
        """
        cache.slots = slots
        positions = (slots - npad[:, None]).clamp(min=0)
        masks = {w: additive_mask(slots, valid, w, self.dtype) for w in dict.fromkeys(self.windows)}
        if self.fast is not None:  # llama-style: the model's own embedding and rotary tables, called directly
            hidden, position_embeddings = fast_inputs(self.ee.decoder, ids, positions)
            return hidden, {"position_embeddings": position_embeddings, self._cache_name: cache}, masks
        captured = {}

        def hook(_module, args, kwargs):
            bound = self._signature.bind_partial(*args, **kwargs)
            for name, value in bound.arguments.items():
                if self._params[name].kind is inspect.Parameter.VAR_KEYWORD:
                    captured.update(value)
                else:
                    captured[name] = value
            raise _Stop

        handle = self.ee.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.ee.decoder(input_ids=ids, attention_mask=masks[self.windows[0]], position_ids=positions, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        hidden = captured.pop(self._hidden_name)
        captured[self._cache_name] = cache
        captured["use_cache"] = True
        if self.ee.spec.rotary_by_layer_type:  # block 1 got its own type's table: each type's, for :meth:`_blocks`
            rotary = self.ee.decoder.rotary_emb
            captured["position_embeddings"] = {kind: rotary(hidden, positions, kind) for kind in set(self._layer_types)}
        return hidden, captured, masks

    def _inputs_into(self, out: torch.Tensor, step: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor,
                     npad: torch.Tensor, cache: StaticKV, targets: list[torch.Tensor], zeros: list[torch.Tensor]) -> None:
        """:meth:`_inputs` of each row's last token (column ``step`` of ``out``), written into buffers: ``targets`` the
        hidden state, the rotary tables and the masks by window; ``zeros`` zeroed. One compiled function, so that a
        step whose pieces read buffers gets its inputs where they are made, not copied after."""
        ids = out.gather(1, step.expand(out.shape[0])[:, None])
        hidden, kwargs, masks = self._inputs(ids, slots, valid, npad, cache)
        for target, source in zip(targets, [hidden, *kwargs["position_embeddings"], *masks.values()]):
            target.copy_(source)
        for tensor in zeros:
            tensor.zero_()

    def _blocks(self, hidden, kwargs, masks, layers: range, rows: list[int] | None = None,
                hold: tuple[torch.Tensor, torch.Tensor] | None = None, previous: bool = False, run=block_forward,
                pair: bool = False, delta: torch.Tensor | None = None):
        """Run blocks ``layers`` (1-based). Block l runs on the first ``rows[l-1]`` rows; the others pass through.
        ``hold``: ``(rows, state)``: those rows' input to every block is ``state`` (a dynamic exit's exited rows).
        ``previous``: also return the last block's input. ``run``: the fast path's :func:`block_forward`, or its
        compiled version (the decode step's). ``pair`` (the fast path, every row): the output as ``(residual, delta)``,
        its last add left to the caller (:func:`block_forward`); ``delta``: the input's own pending add (the input is
        ``hidden + delta``), which the first block fuses with its norm as every other block does."""
        if self.fast is not None:
            return self._fast_blocks(hidden, kwargs, masks, layers, rows, hold, previous, run, pair, delta)
        if delta is not None:
            hidden = hidden + delta
        total, inputs = hidden.shape[0], hidden
        for layer in layers:
            block = self.ee.blocks[layer - 1]
            if hold is not None:
                hidden = torch.where(hold[0][:, None, None], hold[1], hidden)
            inputs = hidden
            n = total if rows is None else rows[layer - 1]
            call = {**kwargs, "attention_mask": masks[self.windows[layer - 1]]}
            if isinstance(call.get("position_embeddings"), dict):  # one rotary table per layer type (Gemma 3)
                call["position_embeddings"] = call["position_embeddings"][self._layer_types[layer - 1]]
            if n < total:
                call = {name: value if name in UNBATCHED_ARGS else take_rows(value, slice(0, n), total)
                        for name, value in call.items()}
            out = block(hidden[:n], **call)
            out = out[0] if isinstance(out, tuple) else out
            hidden = out if n == total else torch.cat([out, hidden[n:]])
        return (hidden, inputs) if previous else hidden

    def _fast_blocks(self, hidden, kwargs, masks, layers: range, rows, hold, previous: bool, run, pair: bool = False,
                     delta: torch.Tensor | None = None):
        """:meth:`_blocks` on the fast path: each block one call of ``run`` (:func:`block_forward`, compiled once for
        every block), its last residual add left to the next block while every row runs it."""
        cache, (cos, sin) = kwargs[self._cache_name], kwargs["position_embeddings"]
        total = hidden.shape[0]
        residual, inputs = hidden, hidden
        for layer in layers:
            block, mask = self.fast[layer - 1], masks[self.windows[layer - 1]]
            n = total if rows is None else rows[layer - 1]
            if previous and layer == layers[-1]:
                inputs = residual if delta is None else residual + delta
                if hold is not None:
                    inputs = torch.where(hold[0][:, None, None], hold[1], inputs)
            if n == total:
                residual, delta = block.pair(residual, delta, mask, (cos, sin), cache, hold, run)
                continue
            if delta is not None:  # a slice of the rows runs: settle the pending add first
                residual, delta = residual + delta, None
            out = block(residual[:n], mask[:n], (cos[:n], sin[:n]), cache, run)
            residual = torch.cat([out, residual[n:]])
        out = (residual, delta) if pair else residual if delta is None else residual + delta
        return (out, inputs) if previous else out

    def _shared_block(self, hidden, kwargs, masks, groups: list[tuple[int, int]], run=block_forward) -> torch.Tensor:
        """The shared exit block on the rows of each exit that reads through it (``groups``: ``(layer, rows)`` in row
        order), each exit with its own cache layer after the model's; in the block's dtype (float32). Identity without
        one. ``run``: :func:`block_forward` or its compiled version."""
        if self.own_shared:
            return self._own_shared_block(hidden, kwargs, masks, groups)
        if self.shared is None:
            return hidden
        adapters, cache = self.ee.adapters, kwargs[self._cache_name]
        cos, sin = kwargs["position_embeddings"]
        slots, parts, start = cache.slots, [], 0
        dtype = self.shared.dtype
        for layer, count in groups:
            rows = slice(start, start + count)
            part = hidden[rows]
            if adapters.has_block(layer):
                block = self._shared_at(layer)  # its own keys and values, after the model's layers
                cache.slots = slots[rows]
                mask = masks[self.windows[-1]][rows].to(dtype)
                part = block(part.to(dtype), mask, (cos[rows].to(dtype), sin[rows].to(dtype)), cache, run).to(hidden.dtype)
            parts.append(part)
            start += count
        cache.slots = slots
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _own_shared_block(self, hidden, kwargs, masks, groups: list[tuple[int, int]]) -> torch.Tensor:
        """:meth:`_shared_block` off the fast path (Gemma 3): the block's own forward in float32 on each exit's rows,
        with the last block's mask and rotary table (the block is a copy of it), as the model's own generate runs it."""
        cache, total = kwargs[self._cache_name], hidden.shape[0]
        slots, parts, start = cache.slots, [], 0
        for layer, count in groups:
            rows = slice(start, start + count)
            part = hidden[rows]
            if layer in self.own_shared:
                call = {**kwargs, "attention_mask": masks[self.windows[-1]]}
                if isinstance(call.get("position_embeddings"), dict):  # one rotary table per layer type
                    call["position_embeddings"] = call["position_embeddings"][self._layer_types[-1]]
                call = {name: value if name in UNBATCHED_ARGS else cast_floats(take_rows(value, rows, total), torch.float32)
                        for name, value in call.items()}
                cache.slots = slots[rows]
                out = self.own_shared[layer](part.float(), **call)
                part = (out[0] if isinstance(out, tuple) else out).to(hidden.dtype)
            parts.append(part)
            start += count
        cache.slots = slots
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _fast_shared_only(self, mode: str) -> None:
        """Refuse ``mode`` where the shared exit block runs as its own module: its checks and drafts need the fast path's
        fused block (its keys and values without running it)."""
        if self.own_shared:
            raise EarlyExitError(f"{mode} through a shared exit block need the engine's fast path ({FAST_FAMILIES}); "
                                 f"{self.ee.config.model_type} decodes it with fixed exits only")

    def _shared_at(self, layer: int) -> FusedBlock:
        """The shared exit block writing exit ``layer``'s own cache layer (after the model's layers)."""
        block = copy.copy(self.shared)
        block.layer_idx = self.n_layers + layer
        return block

    def _shared_kv(self, states: torch.Tensor, position_embeddings, cache, layers: list[int],
                   slots: torch.Tensor | None = None) -> None:
        """Only the keys and values the shared exit block computes at exits ``layers`` (consecutive in one cache stack)
        for their inputs ``states`` ``[len(layers) or 1, R, q, D]``, in one product that reads the block's weights once
        (:func:`kv_forward`), at ``slots`` (default: the cache's): a dynamic exit's checks keep the block's cache whole
        without running the block."""
        block = self.shared
        weight, bias = block.kv_rows()
        keys, values = cache.stacked(0, 0, [self.n_layers + layer for layer in layers])
        cos, sin = position_embeddings
        self._run_kv(states, block.ln1[None], weight[None], None if bias is None else bias[None], cos, sin, keys, values,
                     cache.slots if slots is None else slots, block.eps1, block.kv_heads, block.head_dim)

    def _adapt(self, hidden: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
        """Exit adapters on rows grouped by exit: ``groups`` is ``(layer, rows)`` in row order (identity without adapters)."""
        adapters = self.ee.adapters
        if adapters is None:
            return hidden
        parts, start = [], 0
        for layer, count in groups:
            parts.append(adapters(hidden[start : start + count], layer))
            start += count
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _logits(self, hidden: torch.Tensor, banned: torch.Tensor | None = None, layer: int | None = None) -> torch.Tensor:
        """Float exit logits of block outputs; ``banned`` token ids (EOS under ``ignore_eos``) get -inf."""
        logits = self.ee.exit_logits(hidden, layer).float()
        if banned is not None and banned.numel():
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits

    def _head(self, hidden: torch.Tensor, groups: list[tuple[int, int]], banned: torch.Tensor | None) -> torch.Tensor:
        """Float logits of block outputs grouped by exit (``groups`` as :meth:`_adapt`), through their adapters."""
        return self._logits(self._adapt(hidden, groups), banned)

    def _greedy(self, hidden: torch.Tensor, groups: list[tuple[int, int]], banned: torch.Tensor | None) -> torch.Tensor:
        """Greedy tokens ``[R]`` of block outputs grouped by exit (the head and its argmax, compiled together)."""
        return self._head(hidden, groups, banned).argmax(-1)

    def _prompt_pass(self, run: Callable[[torch.Tensor], None], shape: tuple[int, int], state: list[torch.Tensor],
                     graph: bool = True) -> Callable[[torch.Tensor], None]:
        """A program's prompt pass ``run(ids)`` (it writes its results in place). On the fast path on a GPU, for at
        most :data:`PROMPT_GRAPH_TOKENS` prompt tokens and with ``graph``, it is captured once with its ids read from a
        buffer of ``shape`` and replayed; ``state``: the tensors it changes (as :meth:`_graphs`)."""
        if not (graph and self.cuda_graphs and self.fast is not None) or shape[0] * shape[1] > PROMPT_GRAPH_TOKENS:
            return run
        ids = torch.zeros(shape, dtype=torch.long, device=self.device)
        graphed = None

        def replay(new_ids: torch.Tensor) -> None:
            nonlocal graphed
            ids.copy_(new_ids)
            if graphed is None:
                graphed = self._graph(lambda: run(ids), state)
            graphed()

        return replay

    def _graph(self, step: Callable[[], torch.Tensor], state: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``step`` advances ``state`` in place; on a GPU capture it once and replay it."""
        return self._graphs([step], state)[0]

    def _graphs(self, steps: list[Callable], state: list[torch.Tensor]) -> list[Callable]:
        """Several pieces of one decode step that the host chains (each reads and writes buffers allocated before
        it, in place); on a GPU each is captured once, in order, and replayed. ``state``: the tensors they change,
        restored after the warm-up and the capture."""
        if not self.cuda_graphs:
            return steps
        saved = [tensor.clone() for tensor in state]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for step in steps:
                step()  # warm-up: lazy initialisation, cuBLAS workspaces
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        replays = []
        for step in steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            replays.append(_replay(graph, out))
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        return replays

    def _stepper(self, plan: Plan, state: list[torch.Tensor], decide: str) -> Callable[[], None]:
        """One step of ``plan`` (:mod:`earlyexit.engine.control`) as this engine runs it: eagerly without CUDA graphs;
        with them, ``decide`` ``host`` (a graph per piece, the host reading each branch's flag) or ``device`` (one graph
        whose branches are conditional nodes). ``state``: the tensors the plan changes (as :meth:`_graphs`)."""
        if not self.cuda_graphs:
            return lambda: walk(plan)
        way, nodes = resolve(decide, self.nodes)
        if way == "device":
            return capture(plan, state, self.device, nodes)
        parts = pieces(plan)
        replays = dict(zip(map(id, parts), self._graphs(parts, state)))
        return lambda: walk(plan, lambda piece: replays[id(piece)]())

    def _time(self, step: Callable[[], object], state: list[torch.Tensor], repeats: int = 10) -> float:
        """GPU seconds one replay of ``step`` takes (after an untimed one), ``state`` restored after. A step advances
        the decode loop: ``repeats`` + 1 replays must fit in the answer's columns."""
        saved = [tensor.clone() for tensor in state]
        step()
        seconds = gpu_seconds(step, repeats)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        return seconds

    # ------------------------------------------------------------------------------------------ set-up
    @property
    def programs(self) -> int:
        """Decoding programs kept for reuse (one per shape of work)."""
        return len(self._programs)

    def _program(self, key: tuple, build: Callable[[], Callable]):
        """A decoding program for one shape of work: its buffers, cache and captured graph, built once and
        reused by later calls of the same shape (the few most recent ones are kept)."""
        program = self._programs.pop(key, None) or build()
        self._programs[key] = program
        while len(self._programs) > KEEP_PROGRAMS + self._calibrating:
            self._programs.pop(next(iter(self._programs)))
        return program

    def _shape(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Prompts on the device; with CUDA graphs, left-padded to a multiple of 16 so programs are reused."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        extra = -ids.shape[1] % 16 if self.cuda_graphs else 0
        if extra:
            ids = torch.cat([ids.new_zeros(ids.shape[0], extra), ids], 1)
            mask = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1)
        return ids, mask

    def _buffers(self, rows: int, prompt: int, capacity: int):
        """The cache and the per-row validity of each slot (prompt padding is invalid) and pad counts. With CUDA graphs
        the cache holds a multiple of :data:`CACHE_SLOTS` slots, so that answers of other lengths reuse the compiled
        step (the mask hides the slots past a row's position)."""
        if self.cuda_graphs:
            capacity = -(-capacity // CACHE_SLOTS) * CACHE_SLOTS
        valid = torch.ones(rows, capacity, dtype=torch.bool, device=self.device)
        npad = torch.zeros(rows, dtype=torch.long, device=self.device)

        def load(ids, mask):
            repeat = rows // ids.shape[0]
            mask = mask.repeat(repeat, 1)
            valid[:, :prompt] = mask
            npad.copy_((~mask).sum(1))
            return ids.repeat(repeat, 1)

        return StaticKV(capacity), valid, npad, load

    def _prefill(self, ids, valid, npad, cache, layers: range, rows=None, groups=None) -> torch.Tensor:
        slots = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        hidden, kwargs, masks = self._inputs(ids, slots, valid, npad, cache)
        hidden = self._blocks(hidden, kwargs, masks, layers, rows)
        return (hidden if groups is None else self._shared_block(hidden, kwargs, masks, groups))[:, -1:]

    # ------------------------------------------------------------------------------------------ all exits
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        exit_layers: list[int],
        generation: GenerationArgs | None = None,
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        **changes,
    ) -> dict[int, Generation]:
        """Greedy (or sampled) decoding from every exit in ``exit_layers`` in one batched pass.

        Args:
            input_ids: ``[B, T]`` left-padded prompts.
            attention_mask: ``[B, T]``.
            exit_layers: exits 1..N; block l runs only on the rows of exits ≥ l.
            generation: decoding options (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``); keyword
                ``changes`` override single fields (``max_new_tokens=12``).
            eos_token_id, pad_token_id, ignore_eos: as :meth:`EarlyExitHead.generate`.

        Returns:
            ``{layer: Generation}`` for each exit, each as :meth:`EarlyExitHead.generate` would return it.
        """
        args = options(generation, **changes)
        exits = sorted({self.ee.check_layer(layer) for layer in exit_layers}, reverse=True)
        stops = self.stops(eos_token_id, pad_token_id, ignore_eos)
        ids, mask = self._shape(input_ids, attention_mask)
        return self._exits_run(ids, mask, exits, args, stops)

    def _exits_run(self, ids, mask, exits: list[int], args: GenerationArgs, stops: Stops) -> dict[int, Generation]:
        """:meth:`generate` on prompts already on the device (``exits``: deepest first)."""
        exits = sorted(exits, reverse=True)
        batch, prompt = ids.shape
        key = ("exits", tuple(exits), batch, prompt, args.max_new_tokens, args.do_sample, args.temperature, args.top_p, stops)
        out = self._program(key, lambda: self._exits_program(exits, batch, prompt, args, stops))(ids, mask)
        return {layer: stops.finish(out[i * batch : (i + 1) * batch], args.max_new_tokens) for i, layer in enumerate(exits)}

    # ------------------------------------------------------------------------------------------ schedules
    def schedules(self, args: GenerationArgs) -> bool:
        """Whether an adaptive mode picks what pays by timing it (``generation.schedule auto`` on the fast path with
        CUDA graphs; elsewhere the times say little, and every check runs)."""
        return args.schedule == "auto" and self.cuda_graphs and self.fast is not None

    def falls_back(self, args: GenerationArgs) -> bool:
        """Whether an adaptive mode times its stretches against full depth within an answer (``generation.fallback``
        with CUDA graphs: eager steps' times say little)."""
        return args.fallback and self.cuda_graphs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calibration(self, given, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches a schedule is timed on: ``given`` ``(input_ids, attention_mask)`` cut into batches of this call's
        size (at most :data:`CALIBRATION_BATCHES`; fewer rows than a batch are repeated to fill one), else the call's
        own prompts."""
        if given is None:
            return [(ids, mask)]
        cal_ids, cal_mask = self._shape(*given)
        batch, rows = ids.shape[0], cal_ids.shape[0]
        if rows < batch:
            repeat = -(-batch // rows)
            return [(cal_ids.repeat(repeat, 1)[:batch], cal_mask.repeat(repeat, 1)[:batch])]
        count = min(rows // batch, CALIBRATION_BATCHES)
        return [(cal_ids[i * batch : (i + 1) * batch], cal_mask[i * batch : (i + 1) * batch]) for i in range(count)]

    def _fastest(self, key: tuple, candidates: list, decode: Callable[[object, torch.Tensor, torch.Tensor], object],
                 batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]):
        """The candidate that decodes ``batches()`` (:meth:`_calibration`) in the least time a generated token, for
        every later call of ``key``.

        ``candidates[0]`` is full depth, the baseline: another is chosen only where it beats full depth by
        :data:`SCHEDULE_MARGIN` (a setting that gains less is not worth the risk that the calibration prompts flatter
        it). Each candidate decodes the batches once to build its programs, then twice timed (the faster pass counts;
        ``decode(candidate, ids, mask)`` returns a :class:`Generation`). The programs a candidate built are dropped
        after its timing, and never push out those the caller's own calls built. :attr:`calibrations` keeps the
        seconds a token, :attr:`calibration_depths` a dynamic candidate's layers a token."""
        if key in self._schedules:
            return self._schedules[key]
        times, depths, batches = {}, {}, batches()
        for candidate in candidates:
            before = set(self._programs)
            self._calibrating += 2
            try:
                for ids, mask in batches:
                    decode(candidate, ids, mask)
                passes = []
                for _ in range(2):
                    self._sync()
                    start, tokens, layers = time.perf_counter(), 0, []
                    for ids, mask in batches:
                        out = decode(candidate, ids, mask)
                        tokens += int(out.n_tokens.sum())
                        if getattr(out, "layers", None) is not None:
                            layers.append(out.layers[out.layers > 0].float())
                    self._sync()
                    passes.append((time.perf_counter() - start) / max(1, tokens))
                times[candidate] = min(passes)
                if layers:
                    depths[candidate] = float(torch.cat(layers).mean())
            finally:
                self._calibrating -= 2
                for program in set(self._programs) - before:
                    self._programs.pop(program, None)
        baseline = candidates[0]
        best = min(times, key=times.get)
        if best != baseline and times[best] > (1 - SCHEDULE_MARGIN) * times[baseline]:
            best = baseline
        self._schedules[key] = best
        self.calibrations[key] = times
        if depths:
            self.calibration_depths[key] = depths
        return best

    def _observe(self, key: tuple, fell_back: bool, baseline) -> None:
        """After a call of the scheduled setting ``key``: whether its fallback took over. Where it did in most of the
        last :data:`RESCHEDULE_CALLS` calls, ``key`` runs ``baseline`` (full depth) from the next call on, and
        :attr:`calibrations` says so (``"fell back"``: the calls' share)."""
        if self._schedules.get(key, baseline) == baseline:
            return
        seen = self._fell_back.setdefault(key, collections.deque(maxlen=RESCHEDULE_CALLS))
        seen.append(fell_back)
        if len(seen) == RESCHEDULE_CALLS and sum(seen) >= RESCHEDULE_SHARE * RESCHEDULE_CALLS:
            self._schedules[key] = baseline
            self.calibrations.setdefault(key, {})["fell back"] = sum(seen) / RESCHEDULE_CALLS

    def _exits_program(self, exits: list[int], batch: int, prompt: int, args: GenerationArgs, stops: Stops):
        total, new = len(exits) * batch, args.max_new_tokens
        exit_of_row = [layer for layer in exits for _ in range(batch)]
        rows = [sum(exit >= layer for exit in exit_of_row) for layer in range(1, self.n_layers + 1)]
        groups = [(layer, batch) for layer in exits]
        cache, valid, npad, load = self._buffers(total, prompt, prompt + new)
        banned, is_eos = stops.tensors(self.device)
        choose = select(args)
        loop = Columns(total, new, stops.pad, self.device)
        layers = range(1, exits[0] + 1)
        graphed = None

        def first(ids):  # the prompt pass and its answer, column 0
            loop.out[:, 0] = choose(self._head(self._prefill(ids, valid, npad, cache, layers, rows, groups)[:, -1], groups, banned))

        first = self._prompt_pass(first, (total, prompt), loop.state(), graph=not args.do_sample)

        def step():
            hidden, kwargs, masks = self._decode_inputs(loop.last(), loop.slot, valid, npad, cache)
            hidden = self._decode_blocks(hidden, kwargs, masks, layers, rows)
            hidden = self._shared_block(hidden, kwargs, masks, groups, self._run_block)
            if args.do_sample:
                token = choose(self._decode_head(hidden[:, -1], groups, banned))
            else:
                token = self._decode_greedy(hidden[:, -1], groups, banned)
            loop.advance(token)
            return token

        def run(ids, mask):
            nonlocal graphed
            ids = load(ids, mask)
            loop.start(prompt)
            first(ids)
            if graphed is None:  # sampling draws host-side random state: it runs eagerly
                graphed = step if args.do_sample else self._graph(step, loop.state())
            until_done(graphed, loop.out, is_eos)
            return loop.out.clone()

        return run

    def stops(self, eos_token_id=None, pad_token_id=None, ignore_eos: bool = False) -> Stops:
        eos_ids, pad = self.ee.eos_and_pad(eos_token_id, pad_token_id)
        return Stops(tuple(eos_ids), pad, ignore_eos)


@dataclass(frozen=True)
class Stops:
    """When rows stop and what fills them afterwards: the EOS ids, the pad id, and ``ignore_eos`` (never stop:
    EOS is banned from the logits instead, for fixed-length benchmarks)."""

    eos_ids: tuple[int, ...]
    pad: int
    ignore_eos: bool = False

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``banned`` token ids (EOS under ``ignore_eos``) and the ``is_eos`` ids that end a row (None: never)."""
        banned = torch.tensor(self.eos_ids if self.ignore_eos else [], dtype=torch.long, device=device)
        ends = None if self.ignore_eos or not self.eos_ids else torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        return banned, ends

    def finish(self, tokens: torch.Tensor, max_new_tokens: int) -> Generation:
        return finish(tokens, [] if self.ignore_eos else list(self.eos_ids), self.pad, max_new_tokens)


class Columns:
    """A decode loop's state on the device, advanced in place so that a CUDA graph can replay the step.

    ``out`` (``[R, new]``) holds each row's tokens, column 0 the prompt's answer; ``step`` is the column written
    last and ``slot`` each row's cache slot of its next input token; ``extras`` are further ``[R, new]`` per-token
    records (a dynamic exit's layer).
    """

    def __init__(self, rows: int, new: int, pad: int, device, extras: int = 0):
        self.pad = pad
        self.out = torch.full((rows, new), pad, dtype=torch.long, device=device)
        self.extras = [torch.zeros((rows, new), dtype=torch.long, device=device) for _ in range(extras)]
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.slot = torch.zeros((rows, 1), dtype=torch.long, device=device)

    def start(self, prompt: int) -> None:
        self.out.fill_(self.pad)
        for extra in self.extras:
            extra.zero_()
        self.step.zero_()
        self.slot.fill_(prompt)

    def last(self) -> torch.Tensor:
        """``[R, 1]`` the tokens written last: the next step's inputs."""
        return self.out.gather(1, self.step.expand(self.out.shape[0])[:, None])

    def advance(self, token: torch.Tensor, *extras: torch.Tensor) -> None:
        """Write ``token`` (and ``extras``, ``[R]`` each) to the next column and move every row one slot on."""
        self.step.add_(1)
        column = self.step.expand(self.out.shape[0])[:, None]
        self.out.scatter_(1, column, token[:, None])
        for buffer, value in zip(self.extras, extras):
            buffer.scatter_(1, column, value[:, None])
        self.slot.add_(1)

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes (restored after a graph's warm-up and capture)."""
        return [self.out, *self.extras, self.step, self.slot]


KEEP_PROGRAMS = 8
"""Decoding programs (one per shape of work: its cache, buffers and captured graphs) kept for reuse, the most recently
used ones."""

CALIBRATION_BATCHES = 4
"""A schedule times its candidates on at most this many batches of the calibration prompts."""

SCHEDULE_MARGIN = 0.03
"""An adaptive choice (a subset of the check layers, speculation) is taken only where it decoded the calibration
prompts at least this share faster a token than full depth."""

RESCHEDULE_CALLS = 8
"""A scheduled adaptive choice whose fallback took over (:func:`until_done`) in at least :data:`RESCHEDULE_SHARE` of
its last this many calls runs full depth from then on: the calibration prompts flattered it (measured: at batch 8 a
check chosen on 16 prompts fell back on 77–83% of the tokens of 200 records, 0.96–1.02× of full depth)."""

RESCHEDULE_SHARE = 0.75

CACHE_SLOTS = 64
"""A decode program's cache holds a multiple of this many slots: the compiled step is specialised to the cache's size,
so prompts whose lengths differ by less reuse it (attention over at most 63 hidden slots more)."""

PROMPT_GRAPH_TOKENS = 2048
"""A prompt pass of at most this many tokens (rows × prompt length) is replayed as a CUDA graph: run eagerly, its
small kernels are launched one by one from Python, a cost the bench counts in every run (SmolLM2 at batch 1:
docs/benchmarks.md).
Longer passes are bound by their matrix products, and a graph would keep their activations' memory."""

GEMV_BELOW = 2048
"""``compile_mode auto`` takes ``gemv`` below this hidden size (measured: SmolLM2's 576 gains, Llama-2-7B's 4,096
loses; docs/benchmarks.md)."""


def compiler(mode: str, hidden_size: int) -> dict:
    """``torch.compile``'s keyword arguments for a ``generation.compile_mode`` on a model of ``hidden_size``."""
    if mode == "auto":
        mode = "gemv" if hidden_size < GEMV_BELOW else "default"
    if mode == "gemv":  # inductor decomposes one-row matrix products into fusable reductions under this option
        return {"options": {"coordinate_descent_tuning": True}}
    return {"mode": None if mode == "default" else mode}


_COMPILED: dict[tuple, Callable] = {}


def compiled(fn: Callable, how: dict) -> Callable:
    """``fn`` through ``torch.compile`` with ``how``; a pure function (not a method) is wrapped once a process for each
    way, so every engine shares it (dynamo keeps the compiled code on ``fn``'s code object, guarded by its inputs'
    shapes and dtypes, never by which layer)."""
    if hasattr(fn, "__self__"):  # an engine's method: its own (kept with the engine, not here)
        return torch.compile(fn, dynamic=False, **how)
    key = (fn, repr(sorted(how.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False, **how)
    return _COMPILED[key]


def gpu_seconds(step: Callable[[], object], repeats: int) -> float:
    """GPU seconds one call of ``step`` takes: ``repeats`` calls between two CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / repeats


def _replay(graph: torch.cuda.CUDAGraph, out):
    def replay():
        graph.replay()
        return out

    return replay


def take_rows(value, rows: slice, total: int):
    """``rows`` of every tensor (nested in tuples) whose leading dimension is the batch (``total`` rows)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(take_rows(item, rows, total) for item in value)
    return value


def at_cache_layer(block: torch.nn.Module, layer_idx: int) -> torch.nn.Module:
    """``block`` (the same weights) writing cache layer ``layer_idx``: a shallow copy whose attention module is its own
    shallow copy, so the original keeps its index."""
    attention = copy.copy(block.self_attn)
    attention.layer_idx = layer_idx
    moved = copy.copy(block)
    moved._modules = {**block._modules, "self_attn": attention}
    return moved


SYNC_EVERY = 16
"""Decode steps between the host's looks at a decode loop's results (has every row ended? is an adaptive mode slower
than full depth?): the only synchronisations of a device-decided loop."""


DEFER = SYNC_EVERY
"""A dynamic exit's deferred K/V: positions whose step skipped the blocks above its exit wait for their keys and values
there until a later token runs those blocks, or at most this many steps (the host flushes them every DEFER steps)."""


def until_done(step: Callable, out: torch.Tensor, eos: torch.Tensor | None, full: tuple[Callable, float] | None = None,
               flush: Callable | None = None) -> int | None:
    """Run ``step`` (which writes column t of ``out``) for t = 1.. until ``out`` is full or, every :data:`SYNC_EVERY`
    steps (a host sync each), every row holds one of ``eos``.

    ``full``: (the full-depth step, its GPU seconds a step): an adaptive step times each stretch of steps on the GPU
    and, once the answer so far is behind full depth (:class:`Behind`), the rest of it runs the full-depth step.
    ``flush``: run before every :data:`DEFER`-th step (a dynamic exit's deferred K/V), and once where the full-depth
    step takes over (it defers nothing, so never again after). Returns the step at which it switched (None: never)."""
    timer = Stretch() if full is not None else None
    behind = Behind(full[1]) if full is not None else None
    switched = None
    for t in range(1, out.shape[1]):
        if flush is not None and switched is None and t > 1 and (t - 1) % DEFER == 0:
            flush()
        step()
        if t % SYNC_EVERY:
            continue
        if eos is not None and bool(torch.isin(out[:, : t + 1], eos).any(1).all()):
            return switched
        if timer is not None and switched is None:
            if behind.add(timer.seconds(), SYNC_EVERY):
                if flush is not None:
                    flush()
                step, switched = full[0], t + 1
            else:
                timer.restart()
    return switched


FALLBACK_MARGIN = 1.0
"""Full-depth steps an adaptive answer may fall behind full depth before the fallback takes over (:class:`Behind`)."""


class Behind:
    """Whether an adaptive answer has fallen behind full depth: the GPU seconds of every stretch so far against the
    seconds full depth's step (``step_seconds``) would have taken for the same tokens, summed over the answer, with a
    margin of :data:`FALLBACK_MARGIN` full-depth steps. A stretch alone is noise: 4 speculative cycles at acceptance
    0.84 make 6 tokens or fewer (7.4 on average) about one time in eight, so judging each stretch alone moved 90% of
    the tokens of a speculation whose answers still came out 1.03x faster than full depth's (H100, float32,
    docs/decoding.md). Summed, a faster mode keeps its lead and a slower one falls behind at its own rate: a mode
    slower than full depth loses at most the margin and one stretch an answer."""

    def __init__(self, step_seconds: float, margin: float = FALLBACK_MARGIN):
        self.step, self.margin, self.debt = step_seconds, margin, 0.0

    def add(self, seconds: float, steps: float) -> bool:
        """One more stretch: its GPU seconds and the full-depth steps' worth of tokens it made (per row). Whether
        the answer is now behind by more than the margin."""
        self.debt += seconds - steps * self.step
        return self.debt > self.margin * self.step


class Stretch:
    """GPU time of a stretch of work on the current stream, from its start (or restart) to the call of
    :meth:`seconds` (which waits for it)."""

    def __init__(self):
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.begin.record()

    def restart(self) -> None:
        self.begin.record()

    def seconds(self) -> float:
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3
