"""Dynamic early exits (CALM, Schuster et al., 2022): each token stops at the first confident layer.

A token exits at the first layer ≥ ``min_layer`` whose :func:`confidence` reaches the threshold; the last layer
always exits. Tokens after it still need keys and values at the layers it skipped: its exit state is propagated
upwards (CALM's choice), i.e. every block above the exit takes the exit hidden state as that token's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from earlyexit.engine.core import Columns, Core, Stops, until_done
from earlyexit.generation import GenerationArgs, Measure, options
from earlyexit.model import Generation


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
    """A :class:`Generation` plus ``layers``: ``[B, max_new_tokens]`` exit layer of each token (0 after EOS)."""

    layers: torch.Tensor | None = None


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
        """Greedy decoding where each token exits at the first layer ≥ ``min_layer`` whose
        :func:`confidence` reaches ``threshold`` (the last layer always exits).

        The prompt runs at full depth. Skipped layers' KV: the exit state is propagated upwards (CALM): every
        block above a token's exit takes the exit hidden state as that token's input, so later tokens attend to
        keys and values computed from it. Those blocks still run for the token to fill its KV, so a dynamic exit
        saves the exit's head and the blocks' outputs, not their weights' reads: it measures quality against
        average depth (``layers``), not wall-clock speed.

        Args:
            input_ids, attention_mask: ``[B, T]`` left-padded prompts.
            generation: the options; ``threshold``, ``min_layer`` (default N/4), ``measure`` and ``max_new_tokens``
                are read (decoding is greedy). Keyword ``changes`` override single fields.
            eos_token_id, pad_token_id, ignore_eos: as :meth:`Core.generate`.
        """
        args = options(generation, **changes)
        min_layer = self.ee.check_layer(args.min_layer_of(self.n_layers))
        stops = self.stops(eos_token_id, pad_token_id, ignore_eos)
        ids, mask = self._shape(input_ids, attention_mask)
        batch, prompt = ids.shape
        key = ("dynamic", args.threshold, min_layer, args.measure, batch, prompt, args.max_new_tokens, stops)
        program = self._program(key, lambda: self._dynamic_program(args.threshold, min_layer, args.measure, batch, prompt,
                                                                   args.max_new_tokens, stops))
        out, used = program(ids, mask)
        result = stops.finish(out, args.max_new_tokens)
        steps = torch.arange(args.max_new_tokens, device=out.device)[None, :]
        layers = torch.where(steps < result.n_tokens[:, None], used, 0)
        return DynamicGeneration(result.tokens, result.n_tokens, result.finished, layers)

    def _dynamic_program(self, threshold: float, min_layer: int, measure: Measure, batch: int, prompt: int,
                         max_new_tokens: int, stops: Stops):
        cache, valid, npad, load = self._buffers(batch, prompt, prompt + max_new_tokens)
        banned, ends = stops.tensors(self.device)
        loop = Columns(batch, max_new_tokens, stops.pad, self.device, extras=1)
        used = loop.extras[0]
        graphed = None

        def run_layers(tokens, slots, propagate: bool):
            """One pass over ``tokens`` at ``slots``; the last position picks its exit. With ``propagate`` (decode,
            one token a row) a row that has exited feeds its exit state to every block above."""
            hidden, kwargs, masks = self._inputs(tokens, slots, valid, npad, cache)
            exited = torch.zeros(batch, 1, 1, dtype=torch.bool, device=self.device)
            state = torch.zeros_like(hidden[:, -1:])  # the exit's raw output: what the blocks above take
            adapted = torch.zeros_like(state)  # the exit's output through its adapter: what the head reads
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
                    logits = None if measure == "state" else self._logits(last, banned, layer)
                    now = ~exited[:, 0, 0] & (confidence(logits, last, inputs[:, -1:], measure)[:, 0] >= threshold)
                state = torch.where(now[:, None, None], last, state)
                if self.ee.adapters is not None:
                    adapted = torch.where(now[:, None, None], self._adapt(last, [(layer, batch)]), adapted)
                layer_of = torch.where(now, layer, layer_of)
                exited = exited | now[:, None, None]
            exit_states = adapted if self.ee.adapters is not None else state
            return self._logits(exit_states[:, -1], banned).argmax(-1), layer_of

        def step():
            token, layer = run_layers(loop.last(), loop.slot, propagate=True)
            loop.advance(token, layer)
            return token

        def run(ids, mask):
            nonlocal graphed
            ids = load(ids, mask)
            loop.start(prompt)
            slots = torch.arange(prompt, device=self.device).expand(batch, -1)
            loop.out[:, 0], used[:, 0] = run_layers(ids, slots, propagate=False)  # the prompt runs at full depth
            if graphed is None:
                graphed = self._graph(step, loop.state())
            until_done(graphed, loop.out, ends)
            return loop.out.clone(), used.clone()

        return run
