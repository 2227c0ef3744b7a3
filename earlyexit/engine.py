"""The fast exit-aware decoding engine: the model's own blocks, a static KV cache, masks we build, CUDA graphs.

:class:`Engine` drives the decoder blocks itself instead of calling the model's ``generate``:

- **All exits in one pass** (:meth:`Engine.generate`): K exit layers × B prompts decode as K·B rows of one
  batch, ordered by exit (deepest first), so block ``l`` runs on the leading rows whose exit is ≥ ``l``: a
  slice, never a mask. A row's hidden state stops changing above its exit and the final norm and head read
  it there; each layer's KV cache holds only the rows that reach it.
- **Dynamic exit** (:meth:`Engine.generate_dynamic`, CALM): each token stops at the first layer ≥ a minimum
  whose confidence passes a threshold (:func:`confidence`).
- **Self-speculative decoding** (:meth:`Engine.generate_speculative`, LayerSkip): draft with the first E
  blocks, verify with all blocks, reusing the draft's KV and layer-E states below E.

Everything family-specific stays in the model: the embedding, positional encoding and rotary tables come from
the model's own forward (a pre-hook on block 1 captures the block inputs and stops it there), and the blocks
are the model's own modules, called with the keyword arguments the model itself passes them. We supply the
cache (:class:`StaticKV`, fixed-size buffers written at per-row slots) and the 4D additive attention mask
(causal by slot, padding, sliding windows), so rows of one batch may sit at different positions (speculation
accepts a different number of tokens per row).

On a GPU the decode step is captured once as a CUDA graph that advances its own inputs, so a token costs one
graph replay and no Python per layer. Greedy outputs equal the model's own ``generate`` truncated at the exit
(tests/test_engine.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from earlyexit.errors import EarlyExitError
from earlyexit.model import EarlyExitHead, Generation, finish

Measure = Literal["softmax", "margin", "state"]
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


class StaticKV:
    """Fixed-size key/value buffers, one pair per layer, written at per-row slots.

    The model's attention calls :meth:`update` with the new keys and values of the rows it ran; a layer's
    buffers are allocated on first use with that many rows (so a layer only the deepest exits reach holds only
    their rows) and ``capacity`` slots. ``slots`` (``[R, q]``) says where each row's q new tokens go; the mask
    decides what is read, so stale slots past a row's position (rejected drafts) are never attended to.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows, heads, q, dim = key.shape
        if layer_idx not in self.keys:
            self.keys[layer_idx] = key.new_zeros(rows, heads, self.capacity, dim)
            self.values[layer_idx] = value.new_zeros(rows, heads, self.capacity, value.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.slots[:rows, None, :, None]
        keys.scatter_(2, index.expand(rows, heads, q, dim), key)
        values.scatter_(2, index.expand(rows, heads, q, value.shape[-1]), value)
        return keys, values


def sliding_windows(config) -> list[int | None]:
    """Each block's sliding attention window (None: full attention), as the family's own masks apply it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types[:n]]
    if window is not None and getattr(config, "use_sliding_window", True) is not False:
        return [window] * n
    return [None] * n


def additive_mask(slots: torch.Tensor, valid: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``[R, 1, q, S]`` additive mask: query at slot s sees valid keys at slots ≤ s (and > s − window)."""
    keys = torch.arange(valid.shape[1], device=slots.device)
    seen = (keys[None, None, :] <= slots[:, :, None]) & valid[:, None, :]
    if window is not None:
        seen &= keys[None, None, :] > slots[:, :, None] - window
    zero = torch.zeros((), dtype=dtype, device=slots.device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[:, None]


def confidence(logits: torch.Tensor | None, hidden: torch.Tensor, previous: torch.Tensor, measure: Measure) -> torch.Tensor:
    """CALM's per-token confidence at one layer, ``[R]`` in [0, 1] (higher: more sure).

    ``softmax``: the top probability; ``margin``: top-1 minus top-2 probability; ``state``: cosine similarity
    of this layer's and the previous layer's hidden state (saturation; needs no head), mapped to (1 + cos) / 2.
    """
    if measure == "state":
        return (1 + torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)) / 2
    probs = logits.float().softmax(-1)
    if measure == "softmax":
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class _Stop(Exception):
    """Raised by the block-1 pre-hook once the model's own forward has prepared the block inputs."""


@dataclass
class DynamicGeneration(Generation):
    """A :class:`Generation` plus ``layers``: ``[B, max_new_tokens]`` exit layer of each token (0 after EOS)."""

    layers: torch.Tensor | None = None


@dataclass
class SpeculativeGeneration(Generation):
    """A :class:`Generation` plus draft statistics: ``drafted`` and ``accepted`` tokens, ``cycles`` run."""

    drafted: int = 0
    accepted: int = 0
    cycles: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)


class Engine:
    """Decode an :class:`EarlyExitHead` fast: all exits in one pass, dynamic exits, self-speculation.

    Args:
        ee: the exit-aware model (eval mode; merge LoRA adapters first for speed).
        cuda_graphs: capture the decode step as a CUDA graph; default: on when the model is on a GPU.
        compile: run the decode step's blocks through ``torch.compile`` (fuses the norms, rotary and
            element-wise work between the matmuls; compiles once per exit set and batch shape).
    """

    def __init__(self, ee: EarlyExitHead, cuda_graphs: bool | None = None, compile: bool = False):
        self.ee = ee
        self.device = next(ee.parameters()).device
        self.dtype = ee.norm.weight.dtype if getattr(ee.norm, "weight", None) is not None else torch.float32
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise EarlyExitError("CUDA graphs need the model on a GPU")
        self._programs: dict[tuple, Callable] = {}
        self._decode_blocks = self._blocks
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._decode_blocks = torch.compile(self._blocks, dynamic=False)
        self.windows = sliding_windows(ee.config)
        self.n_layers = ee.n_layers
        self._signature = inspect.signature(ee.blocks[0].forward)
        params = self._params = self._signature.parameters
        self._hidden_name = next(iter(params))
        self._cache_name = next((name for name in _CACHE_NAMES if name in params), None)
        if self._cache_name is None:
            raise EarlyExitError(f"{type(ee.blocks[0]).__name__} takes no cache argument; the engine cannot drive it")

    # ----------------------------------------------------------------------------------------- model pieces
    def _inputs(self, ids: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, npad: torch.Tensor, cache: StaticKV):
        """The model's own embedding and positional inputs for tokens ``ids`` at ``slots``.

        Returns the hidden state entering block 1, the keyword arguments the model passes its blocks (with
        ``cache``, whose write slots become ``slots``), and one additive mask per distinct sliding window.
        """
        cache.slots = slots
        positions = (slots - npad[:, None]).clamp(min=0)
        masks = {w: additive_mask(slots, valid, w, self.dtype) for w in dict.fromkeys(self.windows)}
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
        return hidden, captured, masks

    def _blocks(self, hidden, kwargs, masks, layers: range, rows: list[int] | None = None) -> torch.Tensor:
        """Run blocks ``layers`` (1-based). Block l runs on the first ``rows[l-1]`` rows; the others pass through."""
        total = hidden.shape[0]
        for layer in layers:
            block = self.ee.blocks[layer - 1]
            n = total if rows is None else rows[layer - 1]
            call = {**kwargs, "attention_mask": masks[self.windows[layer - 1]]}
            if n < total:
                call = {name: _take_rows(value, n, total) if name != "cache_position" else value for name, value in call.items()}
            out = block(hidden[:n], **call)
            out = out[0] if isinstance(out, tuple) else out
            hidden = out if n == total else torch.cat([out, hidden[n:]])
        return hidden

    def _logits(self, hidden: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
        """Float exit logits of block outputs; ``banned`` token ids (EOS under ``ignore_eos``) get -inf."""
        logits = self.ee.exit_logits(hidden).float()
        if banned is not None and banned.numel():
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits

    def _graph(self, step: Callable[[], torch.Tensor], state: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``step`` advances ``state`` in place; on a GPU capture it once and replay it."""
        if not self.cuda_graphs:
            return step
        saved = [tensor.clone() for tensor in state]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()  # warm-up: lazy initialisation, cuBLAS workspaces
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for tensor, value in zip(state, saved):
            tensor.copy_(value)

        def replay():
            graph.replay()
            return out

        return replay

    # ------------------------------------------------------------------------------------------ set-up
    def _program(self, key: tuple, build: Callable[[], Callable]):
        """A decoding program for one shape of work: its buffers, cache and captured graph, built once and
        reused by later calls of the same shape (the few most recent ones are kept)."""
        program = self._programs.pop(key, None) or build()
        self._programs[key] = program
        while len(self._programs) > 8:
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
        """The cache and the per-row validity of each slot (prompt padding is invalid) and pad counts."""
        valid = torch.ones(rows, capacity, dtype=torch.bool, device=self.device)
        npad = torch.zeros(rows, dtype=torch.long, device=self.device)

        def load(ids, mask):
            repeat = rows // ids.shape[0]
            mask = mask.repeat(repeat, 1)
            valid[:, :prompt] = mask
            npad.copy_((~mask).sum(1))
            return ids.repeat(repeat, 1)

        return StaticKV(capacity), valid, npad, load

    def _prefill(self, ids, valid, npad, cache, layers: range, rows=None) -> torch.Tensor:
        slots = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        hidden, kwargs, masks = self._inputs(ids, slots, valid, npad, cache)
        return self._blocks(hidden, kwargs, masks, layers, rows)[:, -1:]

    # ------------------------------------------------------------------------------------------ all exits
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        exit_layers: list[int],
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> dict[int, Generation]:
        """Greedy (or sampled) decoding from every exit in ``exit_layers`` in one batched pass.

        Args:
            input_ids: ``[B, T]`` left-padded prompts.
            attention_mask: ``[B, T]``.
            exit_layers: exits 1..N; block l runs only on the rows of exits ≥ l.
            max_new_tokens, eos_token_id, pad_token_id, ignore_eos, do_sample, temperature, top_p: as
                :meth:`EarlyExitHead.generate`.

        Returns:
            ``{layer: Generation}`` for each exit, each as :meth:`EarlyExitHead.generate` would return it.
        """
        exits = sorted({self.ee.check_layer(layer) for layer in exit_layers}, reverse=True)
        eos_ids, pad = self.ee.eos_and_pad(eos_token_id, pad_token_id)
        ids, mask = self._shape(input_ids, attention_mask)
        batch, prompt = ids.shape
        key = ("exits", tuple(exits), batch, prompt, max_new_tokens, tuple(eos_ids), pad, ignore_eos, do_sample, temperature, top_p)
        program = self._program(key, lambda: self._exits_program(exits, batch, prompt, max_new_tokens, eos_ids, pad,
                                                                 ignore_eos, _selector(do_sample, temperature, top_p), do_sample))
        out = program(ids, mask)
        return {
            layer: finish(out[i * batch : (i + 1) * batch], [] if ignore_eos else eos_ids, pad, max_new_tokens)
            for i, layer in enumerate(exits)
        }

    def _exits_program(self, exits, batch, prompt, max_new_tokens, eos_ids, pad, ignore_eos, select, do_sample):
        total = len(exits) * batch
        exit_of_row = [layer for layer in exits for _ in range(batch)]
        rows = [sum(exit >= layer for exit in exit_of_row) for layer in range(1, self.n_layers + 1)]
        cache, valid, npad, load = self._buffers(total, prompt, prompt + max_new_tokens)
        banned = torch.tensor(eos_ids if ignore_eos else [], dtype=torch.long, device=self.device)
        is_eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device)
        out = torch.full((total, max_new_tokens), pad, dtype=torch.long, device=self.device)
        slot = torch.zeros((total, 1), dtype=torch.long, device=self.device)
        step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        layers = range(1, exits[0] + 1)
        graphed = None

        def step():
            last = out.gather(1, step_index.expand(total)[:, None])
            hidden, kwargs, masks = self._inputs(last, slot, valid, npad, cache)
            token = select(self._logits(self._decode_blocks(hidden, kwargs, masks, layers, rows)[:, -1], banned))
            step_index.add_(1)
            out.scatter_(1, step_index.expand(total)[:, None], token[:, None])
            slot.add_(1)
            return token

        def run(ids, mask):
            nonlocal graphed
            ids = load(ids, mask)
            out.fill_(pad)
            out[:, 0] = select(self._logits(self._prefill(ids, valid, npad, cache, layers, rows)[:, -1], banned))
            slot.fill_(prompt)
            step_index.zero_()
            if graphed is None:
                graphed = step if do_sample else self._graph(step, [out, slot, step_index])
            _until_done(graphed, out, None if ignore_eos or not eos_ids else is_eos)
            return out.clone()

        return run

    # ------------------------------------------------------------------------------------ self-speculation
    @torch.no_grad()
    def generate_speculative(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        draft_layer: int,
        n_draft: int = 4,
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> SpeculativeGeneration:
        """Self-speculative decoding (LayerSkip): draft ``n_draft`` tokens from exit ``draft_layer``, verify them
        with the full model in one pass, keep the agreeing prefix plus the full model's next token.

        The verification reuses the draft: blocks ≤ E already wrote the drafted tokens' KV and produced their
        layer-E states, so it runs blocks ≤ E for the last draft only and blocks > E for all of them. Greedy
        output equals full-depth greedy decoding; sampling uses the speculative acceptance rule (accept a draft
        with probability min(1, p/q), else draw from the normalised max(0, p − q)), so tokens follow the full
        model's distribution. Rows of a batch accept different numbers of tokens and continue at their own slots.
        """
        exit_layer = self.ee.check_layer(draft_layer)
        if exit_layer >= self.n_layers:
            raise EarlyExitError(f"draft layer {draft_layer} must be below the last layer {self.n_layers}")
        if n_draft < 1:
            raise EarlyExitError(f"n_draft must be at least 1, got {n_draft}")
        eos_ids, pad = self.ee.eos_and_pad(eos_token_id, pad_token_id)
        ids, mask = self._shape(input_ids, attention_mask)
        batch, prompt = ids.shape
        key = ("speculative", exit_layer, n_draft, batch, prompt, max_new_tokens, tuple(eos_ids), pad, ignore_eos,
               do_sample, temperature, top_p)
        program = self._program(key, lambda: self._speculative_program(
            exit_layer, n_draft, batch, prompt, max_new_tokens, eos_ids, pad, ignore_eos, do_sample, temperature, top_p))
        out, (drafted, accepted, cycles) = program(ids, mask)
        result = finish(out[:, :max_new_tokens], [] if ignore_eos else eos_ids, pad, max_new_tokens)
        return SpeculativeGeneration(result.tokens, result.n_tokens, result.finished, drafted, accepted, cycles)

    def _speculative_program(self, exit_layer, depth, batch, prompt, max_new_tokens, eos_ids, pad, ignore_eos,
                             do_sample, temperature, top_p):
        width = max_new_tokens + depth + 2  # the last column takes the writes of rows that are done
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + width + depth)  # done rows still draft
        banned = torch.tensor(eos_ids if ignore_eos else [], dtype=torch.long, device=self.device)
        is_eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=self.device)
        out = torch.full((batch, width), pad, dtype=torch.long, device=self.device)
        cur = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        pos = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        count = torch.ones(batch, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stats = torch.zeros(3, dtype=torch.long, device=self.device)  # drafted, accepted, cycles
        offsets = torch.arange(depth + 1, device=self.device)
        rows = torch.arange(batch, device=self.device)
        graphed = None

        def dist(hidden):
            logits = self._logits(hidden, banned)
            return probabilities(logits, temperature, top_p) if do_sample else logits

        def choose(scores):
            return sample(scores) if do_sample else scores.argmax(-1)

        def cycle():
            token, states, drafts, draft_scores = cur, [], [], []
            for j in range(depth + 1):  # d draft steps; the last one only runs blocks ≤ E for the last draft
                hidden, kwargs, masks = self._inputs(token, pos + j, valid, npad, cache)
                states.append(self._decode_blocks(hidden, kwargs, masks, range(1, exit_layer + 1)))
                if j == depth:
                    break
                scores = dist(states[-1][:, -1])
                token = choose(scores)[:, None]
                drafts.append(token)
                draft_scores.append(scores)
            drafts = torch.cat(drafts, 1)  # [B, d]
            _, kwargs, masks = self._inputs(torch.cat([cur, drafts], 1), pos + offsets, valid, npad, cache)
            target = dist(self._decode_blocks(torch.cat(states, 1), kwargs, masks, range(exit_layer + 1, self.n_layers + 1)))
            if do_sample:
                q = torch.stack(draft_scores, 1)  # [B, d, V]
                p_draft = target[:, :depth].gather(-1, drafts[..., None])[..., 0]
                q_draft = q.gather(-1, drafts[..., None])[..., 0]
                ok = torch.rand_like(p_draft) * q_draft < p_draft
                residual = torch.cat([(target[:, :depth] - q).clamp(min=0), target[:, depth:]], 1)  # [B, d+1, V]
                accepted = ok.long().cumprod(1).sum(1)
                fix = residual[rows, accepted]
                nxt = sample(fix / fix.sum(-1, keepdim=True).clamp(min=1e-30))
            else:
                best = target.argmax(-1)  # [B, d+1]
                accepted = (drafts == best[:, :depth]).long().cumprod(1).sum(1)
                nxt = best.gather(1, accepted[:, None])[:, 0]
            new = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # [B, d+1]
            keep = (offsets[None, :] <= accepted[:, None]) & ~done[:, None]
            out.scatter_(1, torch.where(keep, count[:, None] + offsets, width - 1), new)
            advance = torch.where(done, 0, accepted + 1)
            finished = (keep & torch.isin(new, is_eos)).any(1) if not ignore_eos else torch.zeros_like(done)
            stats.add_(torch.stack([(~done).sum() * depth, torch.where(done, 0, accepted).sum(), (~done).any().long()]))
            count.add_(advance)
            pos.add_(advance[:, None])
            cur.copy_(torch.where(done, cur[:, 0], nxt)[:, None])
            done.logical_or_(finished | (count >= max_new_tokens))
            return done

        def run(ids, mask):
            nonlocal graphed
            ids = load(ids, mask)
            out.fill_(pad)
            first = choose(dist(self._prefill(ids, valid, npad, cache, range(1, self.n_layers + 1))[:, -1]))
            out[:, 0] = first
            cur.copy_(first[:, None])
            pos.fill_(prompt)
            count.fill_(1)
            done.copy_(torch.isin(first, is_eos) if not ignore_eos else torch.zeros_like(done))
            stats.zero_()
            if graphed is None:
                graphed = self._graph(cycle, [out, cur, pos, count, done, stats])
            for _ in range(max_new_tokens):
                if bool(graphed().all()):
                    break
            return out.clone(), stats.tolist()

        return run

    # ------------------------------------------------------------------------------------------ dynamic exit
    @torch.no_grad()
    def generate_dynamic(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        threshold: float,
        min_layer: int = 1,
        measure: Measure = "softmax",
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
    ) -> DynamicGeneration:
        """Greedy decoding where each token exits at the first layer ≥ ``min_layer`` whose
        :func:`confidence` reaches ``threshold`` (the last layer always exits).

        The prompt runs at full depth. Skipped layers' KV: the exit state is propagated upwards (CALM): every
        block above a token's exit takes the exit hidden state as that token's input, so later tokens attend to
        keys and values computed from it. Those blocks still run for the token to fill its KV, so a dynamic exit
        saves the exit's head and the blocks' outputs, not their weights' reads: it measures quality against
        average depth (``layers``), not wall-clock speed.
        """
        min_layer = self.ee.check_layer(min_layer)
        if measure not in ("softmax", "margin", "state"):
            raise EarlyExitError(f"unknown confidence measure {measure!r}: softmax, margin or state")
        eos_ids, pad = self.ee.eos_and_pad(eos_token_id, pad_token_id)
        ids, mask = self._shape(input_ids, attention_mask)
        batch, prompt = ids.shape
        key = ("dynamic", threshold, min_layer, measure, batch, prompt, max_new_tokens, tuple(eos_ids), pad, ignore_eos)
        program = self._program(key, lambda: self._dynamic_program(threshold, min_layer, measure, batch, prompt,
                                                                   max_new_tokens, eos_ids, pad, ignore_eos))
        out, used = program(ids, mask)
        result = finish(out, [] if ignore_eos else eos_ids, pad, max_new_tokens)
        steps = torch.arange(max_new_tokens, device=out.device)[None, :]
        layers = torch.where(steps < result.n_tokens[:, None], used, 0)
        return DynamicGeneration(result.tokens, result.n_tokens, result.finished, layers)

    def _dynamic_program(self, threshold, min_layer, measure, batch, prompt, max_new_tokens, eos_ids, pad, ignore_eos):
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + max_new_tokens)
        banned = torch.tensor(eos_ids if ignore_eos else [], dtype=torch.long, device=self.device)
        is_eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=self.device)
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=self.device)
        used = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=self.device)
        step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        slot = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        graphed = None

        def run_layers(tokens, slots, propagate: bool):
            """One pass over ``tokens`` at ``slots``; the last position picks its exit. With ``propagate`` (decode,
            one token a row) a row that has exited feeds its exit state to every block above."""
            hidden, kwargs, masks = self._inputs(tokens, slots, valid, npad, cache)
            exited = torch.zeros(batch, 1, 1, dtype=torch.bool, device=self.device)
            state = torch.zeros_like(hidden[:, -1:])
            layer_of = torch.zeros(batch, dtype=torch.long, device=self.device)
            for layer in range(1, self.n_layers + 1):
                inputs = torch.where(exited, state, hidden) if propagate else hidden
                hidden = self._blocks(inputs, kwargs, masks, range(layer, layer + 1))
                if layer < min_layer:
                    continue
                last = hidden[:, -1:]
                if layer == self.n_layers:
                    now = ~exited[:, 0, 0]
                else:
                    logits = None if measure == "state" else self._logits(last, banned)
                    now = ~exited[:, 0, 0] & (confidence(logits, last, inputs[:, -1:], measure)[:, 0] >= threshold)
                state = torch.where(now[:, None, None], last, state)
                layer_of = torch.where(now, layer, layer_of)
                exited = exited | now[:, None, None]
            return self._logits(state[:, -1], banned).argmax(-1), layer_of

        def step():
            last = out.gather(1, step_index.expand(batch)[:, None])
            token, layer = run_layers(last, slot, propagate=True)
            step_index.add_(1)
            out.scatter_(1, step_index.expand(batch)[:, None], token[:, None])
            used.scatter_(1, step_index.expand(batch)[:, None], layer[:, None])
            slot.add_(1)
            return token

        def run(ids, mask):
            nonlocal graphed
            ids = load(ids, mask)
            out.fill_(pad)
            used.zero_()
            slots = torch.arange(prompt, device=self.device).expand(batch, -1)
            out[:, 0], used[:, 0] = run_layers(ids, slots, propagate=False)  # the prompt runs at full depth
            slot.fill_(prompt)
            step_index.zero_()
            if graphed is None:
                graphed = self._graph(step, [out, used, slot, step_index])
            _until_done(graphed, out, None if ignore_eos or not eos_ids else is_eos)
            return out.clone(), used.clone()

        return run


def _take_rows(value, n: int, total: int):
    """The first n rows of every tensor (nested in tuples) whose leading dimension is the batch."""
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_take_rows(item, n, total) for item in value)
    return value


def _selector(do_sample: bool, temperature: float, top_p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Greedy argmax, or temperature / nucleus sampling, over ``[R, V]`` logits."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)
    return lambda logits: sample(probabilities(logits, temperature, top_p))


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


def _until_done(step: Callable, out: torch.Tensor, eos: torch.Tensor | None) -> None:
    """Run ``step`` (which writes column t of ``out``) for t = 1.. until ``out`` is full or, every 16 steps (a
    host sync each), every row holds one of ``eos``."""
    for t in range(1, out.shape[1]):
        step()
        if eos is not None and t % 16 == 0 and bool(torch.isin(out[:, : t + 1], eos).any(1).all()):
            return
