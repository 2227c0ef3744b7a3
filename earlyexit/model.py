"""The exit-aware model: decode or read out a causal LM at any exit layer.

Exit layer ``L`` (1..N) is the output of decoder block ``L``; its logits are
``post_head(head(final_norm(h_L)))`` with the model's *own* final norm and head, so ``L = N`` is
the model's own output. An early exit at ``L`` runs blocks 1..L only (:meth:`EarlyExitHead.truncated`);
the blocks above are never computed and get no KV cache. This is the "logit lens" readout of
nostalgebraist (2020) used as an early exit, as in LayerSkip (Elhoushi et al., 2024).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from earlyexit.arch import ArchSpec, get_submodule, post_head, set_submodule, spec_for
from earlyexit.errors import EarlyExitError
from earlyexit.generation import GenerationArgs, options


def quarter_layers(n_layers: int) -> list[int]:
    """The default exit set: quarters of depth (N/4, N/2, 3N/4, N), rounded, without repeats."""
    return sorted({max(1, round(n_layers * q / 4)) for q in (1, 2, 3, 4)})


ExitLayers = str | int | list[int]
"""How exit layers are given: ``quarters``, ``all``, ``last``, ``everyK``, ``"8,16"``, one layer, or a list (``[8, 16]`` in YAML)."""


def parse_exit_layers(spec: str | int | Iterable[int], n_layers: int) -> list[int]:
    """Turn ``"quarters"``, ``"all"``, ``"last"``, ``"every3"``, ``"8,16"``, an int or a list into sorted, checked layers.

    ``"everyK"`` is every K-th layer counted from the top (so N is always included).
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "quarters":
            return quarter_layers(n_layers)
        if text == "all":
            return list(range(1, n_layers + 1))
        if text == "last":
            return [n_layers]
        if text.startswith("every") and text[5:].isdigit() and int(text[5:]) > 0:
            return sorted(range(n_layers, 0, -int(text[5:])))
        try:
            layers = [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise EarlyExitError(
                f"exit layers {spec!r}: expected 'quarters', 'all', 'everyK' or a comma-separated list of integers"
            ) from None
    elif isinstance(spec, int):
        layers = [spec]
    else:
        layers = [int(layer) for layer in spec]
    if not layers:
        raise EarlyExitError("no exit layers given")
    for layer in layers:
        check_layer(layer, n_layers)
    return sorted(set(layers))


def check_layer(layer: int, n_layers: int) -> int:
    """Return ``layer`` if it is a valid exit (1..N), else raise a clear error."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= n_layers:
        raise EarlyExitError(f"exit layer {layer!r} is out of range: this model has layers 1..{n_layers}")
    return layer


@dataclass
class Generation:
    """What one batched generation returns.

    Attributes:
        tokens: ``[B, max_new_tokens]`` new token ids only (the prompt is never part of it), padded after
            EOS with the pad id.
        n_tokens: ``[B]`` tokens generated before EOS (EOS itself is not counted).
        finished: ``[B]`` whether the row emitted EOS (False means it hit the length limit).
    """

    tokens: torch.Tensor
    n_tokens: torch.Tensor
    finished: torch.Tensor


def unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without the wrappers FSDP and activation checkpointing put around it."""
    while True:
        inner = getattr(module, "_fsdp_wrapped_module", None) or getattr(module, "_checkpoint_wrapped_module", None)
        if inner is None:
            return module
        module = inner


def _compiled_where_grad(forward):
    """``forward`` compiled for calls that record gradients, and itself for calls that do not."""
    compiled = torch.compile(forward)

    def run(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else forward)(*args, **kwargs)

    return run


class EarlyExitHead(nn.Module):
    """Exit-aware view of a Hugging Face causal LM (plain or peft-wrapped).

    The wrapper holds references, never copies: the final norm and head it applies are the model's own
    modules (through peft's base model when wrapped), so gradients at any exit reach the shared head.

    Args:
        lm: a ``*ForCausalLM`` model of a family in :data:`earlyexit.arch.ARCHITECTURES`, or a peft model of one.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.spec: ArchSpec = spec_for(self.base.config.model_type)
        self.n_layers: int = len(self.blocks)
        self._swapped = False

    @property
    def base(self) -> PreTrainedModel:
        """The underlying ``*ForCausalLM`` (peft's base model when wrapped)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def config(self):
        return self.base.config

    @property
    def blocks(self) -> nn.ModuleList:
        return get_submodule(self.base, self.spec.layers)

    @property
    def decoder(self) -> nn.Module:
        """The module that owns the blocks (embeddings → blocks → final norm, no head)."""
        return get_submodule(self.base, self.spec.layers.rpartition(".")[0])

    @property
    def norm(self) -> nn.Module:
        return get_submodule(self.base, self.spec.norm)

    @property
    def head(self) -> nn.Module:
        return get_submodule(self.base, self.spec.head)

    def check_layer(self, layer: int) -> int:
        return check_layer(layer, self.n_layers)

    @property
    def adapters(self):
        """The model's exit adapters (:mod:`earlyexit.adapters`), or None."""
        from earlyexit.adapters import attached

        return attached(self.lm)

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logits of an exit from the raw (un-normalised) output of a block.

        Args:
            hidden: ``[..., D]`` output of decoder block L, before any final norm; for an exit read through the shared
                exit block (kind ``block``), what :meth:`hidden_states` returns for L (the block already applied).
            layer: L; when given and the model has an exit adapter for L, it is applied before the norm.

        Returns:
            ``[..., V]`` logits, equal to the model's own logits when the block is the last one.
        """
        adapters = self.adapters
        if layer is not None and adapters is not None:
            hidden = adapters(hidden, layer)
        return post_head(self.head(self.norm(hidden)), self.config)

    def linear_head(self):
        """The exits' output split for the fused loss (:class:`earlyexit.loss.LinearHead`): adapter and final norm, then
        the head's frozen weight and bias and the family's soft-capping; None when the head is not a plain frozen
        ``nn.Linear`` (a trained or adapted head keeps the reference loss)."""
        from earlyexit.loss import LinearHead

        head = self.head
        if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
            return None
        attr = self.spec.softcap_attr
        cap = getattr(self.config, attr, None) if attr else None

        def pre(hidden: torch.Tensor, layer: int) -> torch.Tensor:
            adapters = self.adapters
            return self.norm(adapters(hidden, layer) if adapters is not None else hidden)

        return LinearHead(pre, head.weight, head.bias, cap)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        exit_layers: Iterable[int] | None = None,
        skip: Iterable[int] = (),
        position_ids: torch.Tensor | None = None,
        raw: bool = False,
    ) -> dict[int, torch.Tensor]:
        """Block outputs at several exits from one teacher-forced pass.

        Only blocks up to the deepest requested exit run. Outputs are captured with forward hooks on the
        blocks themselves, so every layer, the last included, is the *raw* block output: apply
        :meth:`exit_logits` to get logits (never normalise HF's ``hidden_states[-1]`` again). An exit read through
        the shared exit block (exit adapters of kind ``block``) is that block's output on the exit's states instead,
        which :meth:`exit_logits` then reads as it is.

        Args:
            input_ids: ``[B, T]``.
            attention_mask: ``[B, T]``, 1 for real tokens.
            exit_layers: layers 1..N; all layers when None.
            skip: blocks not run at all (layer dropout); a skipped block passes its input through, so its
                exit reads the output of the nearest block below it that ran. Block 1 always runs.
            position_ids: ``[B, T]`` for packed rows (several examples per row, positions restarting at 0 on each, with
                ``attention_mask`` None): the model's own masks then keep attention within each example. Derived from
                ``attention_mask`` when None.
            raw: the blocks' own outputs even at exits read through the shared exit block (what a probe reads).

        Returns:
            ``{layer: hidden [B, T, D]}``.
        """
        layers = list(range(1, self.n_layers + 1)) if exit_layers is None else [self.check_layer(l) for l in exit_layers]
        skip = set(skip) - {1}
        run = [layer for layer in range(1, max(layers) + 1) if layer not in skip]
        captured: dict[int, torch.Tensor] = {}
        blocks = self.blocks
        adapters = self.adapters
        shared = not raw and adapters is not None and any(adapters.has_block(layer) for layer in layers)
        block_kwargs: dict = {}

        def capture(layer: int):
            def hook(_module, _inputs, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [blocks[layer - 1].register_forward_hook(capture(layer)) for layer in run]
        tap = _KwargsTap(block_kwargs, blocks[-1]) if shared else None  # run last, as the shared block would be: its type's kwargs
        try:
            with self.running(run, extra=tap):
                self.decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=positions(attention_mask) if position_ids is None else position_ids,
                    use_cache=False,
                )
        finally:
            for handle in handles:
                handle.remove()
        out = {layer: captured[max(r for r in run if r <= layer)] for layer in layers}
        if shared:
            out = {layer: adapters.run_block(h, block_kwargs) if adapters.has_block(layer) else h for layer, h in out.items()}
        return out

    def compile_blocks(self, on: bool = True) -> None:
        """``on``: each decoder block's ``forward`` runs through ``torch.compile`` where gradients are recorded, i.e.
        in training steps (regional compilation: the blocks share one code object, so one compiled graph serves them
        all; shapes that vary from batch to batch turn it dynamic after the second; hooks and the block list stay
        eager). Forwards without gradients (the teacher pass, validation, measurements) stay eager: each would
        otherwise compile graphs of its own, seconds each on a GPU. Off: the plain forwards again."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in self.blocks:
            block = unwrapped(block)  # under FSDP: the block itself, whose forward runs on gathered weights
            block.__dict__.pop("forward", None)
            if on:
                block.forward = _compiled_where_grad(block.forward)

    @contextmanager
    def truncated(self, exit_layer: int) -> Iterator[None]:
        """Within this context the model *is* its first ``exit_layer`` blocks.

        The model's own forward, KV cache and ``generate`` then run blocks 1..L only, followed by exit L's adapter
        (if the model has one), the final norm and head: its logits are the exit-L logits. Everything is restored
        on leaving.
        """
        layer = self.check_layer(exit_layer)
        adapters, norm = self.adapters, self.norm
        if adapters is not None and adapters.has_block(layer):
            with self.running(range(1, layer + 1), extra=_SharedBlock(adapters, layer)):
                yield
            return
        with self.running(range(1, layer + 1)):
            if adapters is None or str(layer) not in adapters.maps:
                yield
                return
            set_submodule(self.base, self.spec.norm, _AdaptedNorm(adapters, layer, norm))
            try:
                yield
            finally:
                set_submodule(self.base, self.spec.norm, norm)

    @contextmanager
    def running(self, layers: Iterable[int], extra: nn.Module | None = None) -> Iterator[None]:
        """Within this context the model's block list holds only ``layers`` (ascending, 1-based), then ``extra``
        if given (the shared exit block).

        The list is swapped for a shorter one holding the same modules and the config's layer count follows, and so do
        its per-layer attention types where it has them (Gemma 2 and 3, Qwen2: each block keeps its own mask, rotary
        table and cache kind; ``extra``, a copy of the last block, the last block's), so the model's own forward (and
        cache) runs exactly those blocks.
        """
        layers = [self.check_layer(layer) for layer in layers]
        if self._swapped:
            raise RuntimeError("EarlyExitHead block swapping does not nest")
        if layers == list(range(1, self.n_layers + 1)) and extra is None:
            yield
            return
        base, config, blocks = self.base, self.base.config, self.blocks
        n_layers, types = config.num_hidden_layers, getattr(config, "layer_types", None)
        self._swapped = True
        chosen = [blocks[layer - 1] for layer in layers] + ([extra] if extra is not None else [])
        set_submodule(base, self.spec.layers, nn.ModuleList(chosen))
        config.num_hidden_layers = len(chosen)
        if types is not None:
            config.layer_types = [types[layer - 1] for layer in layers] + ([types[n_layers - 1]] if extra is not None else [])
        try:
            yield
        finally:
            set_submodule(base, self.spec.layers, blocks)
            config.num_hidden_layers = n_layers
            if types is not None:
                config.layer_types = types
            self._swapped = False

    def eos_and_pad(self, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> tuple[list[int], int]:
        """Stop ids and filler id: the given ones, else the model's generation config (pad falls back to the first EOS)."""
        own = self.base.generation_config
        eos = eos_token_id if eos_token_id is not None else own.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else own.pad_token_id
        return eos_ids, (pad if pad is not None else (eos_ids[0] if eos_ids else 0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, exit_layer: int | None = None):
        """Logits ``[B, T, V]`` at ``exit_layer`` (default N), computing blocks 1..L only."""
        with self.truncated(self.n_layers if exit_layer is None else exit_layer):
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions(attention_mask),
                use_cache=False,
            ).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        exit_layer: int,
        generation: GenerationArgs | None = None,
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
        streamer=None,
        **changes,
    ) -> Generation:
        """Decode from exit ``exit_layer`` with the model's own ``generate`` and a KV cache for blocks 1..L only
        (the reference path; :class:`earlyexit.engine.Engine` is the fast one).

        Args:
            input_ids: ``[B, T]`` left-padded prompts.
            attention_mask: ``[B, T]``.
            exit_layer: L in 1..N.
            generation: decoding options (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``; seed
                sampling with ``torch.manual_seed`` beforehand); keyword ``changes`` override single fields.
            eos_token_id: stop token(s); the model's generation config when None.
            pad_token_id: filler after EOS; the model's generation config (or the first EOS) when None.
            ignore_eos: never stop: EOS is masked out until ``max_new_tokens`` (fixed-length benchmarks).
            streamer: an HF streamer (batch 1) that receives tokens as they are decoded.
        """
        args = options(generation, **changes)
        own = self.base.generation_config
        eos_ids, pad = self.eos_and_pad(eos_token_id, pad_token_id)
        # A fresh config, so a checkpoint's own sampling defaults (Llama-2's temperature 0.6 …) never leak in.
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens if ignore_eos else 0,
            do_sample=args.do_sample,
            temperature=args.temperature if args.do_sample else None,
            top_p=args.top_p if args.do_sample else None,
            top_k=None,
            eos_token_id=eos_ids or None,
            pad_token_id=pad,
            bos_token_id=own.bos_token_id,
        )
        prompt_len = input_ids.shape[1]
        with self.truncated(exit_layer):
            out = self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer)
        tokens = out[:, prompt_len:]
        return finish(tokens, [] if ignore_eos else eos_ids, pad, args.max_new_tokens)


class _KwargsTap(nn.Module):
    """Stands where the shared exit block would run after the model's blocks (:meth:`EarlyExitHead.hidden_states`):
    keeps the keyword arguments the model passes a block there (masks and rotary table of the last block's type) and
    passes its input through."""

    def __init__(self, kept: dict, last: nn.Module):
        super().__init__()
        self.kept, self.attention_type = kept, getattr(last, "attention_type", None)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.kept.update(kwargs)
        return hidden


class _SharedBlock(nn.Module):
    """The shared exit block as block L + 1 of a truncated model (swapped in by :meth:`EarlyExitHead.truncated`): it
    writes its keys and values at the cache layer after block L's and runs in the adapter's dtype."""

    def __init__(self, adapters: nn.Module, layer: int):
        super().__init__()
        self.adapters, self.layer = adapters, layer
        self.attention_type = getattr(adapters.block, "attention_type", None)  # where a decoder reads the type off the block

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attn = self.adapters.block.self_attn
        own, attn.layer_idx = attn.layer_idx, self.layer  # the cache's layer after blocks 1..L (0-based L)
        try:
            return self.adapters.run_block(hidden, kwargs)
        finally:
            attn.layer_idx = own


class _AdaptedNorm(nn.Module):
    """The final norm preceded by exit L's adapter (swapped in by :meth:`EarlyExitHead.truncated`)."""

    def __init__(self, adapters: nn.Module, layer: int, norm: nn.Module):
        super().__init__()
        self.adapters, self.layer, self.norm = adapters, layer, norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.adapters(hidden, self.layer))


def positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T]`` position ids that start at 0 on each row's first real token (as ``generate`` does).

    Without them, left-padded rows of absolute-position families (GPT-2) would see shifted positions.
    """
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def finish(tokens: torch.Tensor, eos_ids: list[int], pad: int, max_new_tokens: int) -> Generation:
    """Pad ``tokens`` [B, t] to ``max_new_tokens`` and find each row's EOS."""
    batch, length = tokens.shape
    if length < max_new_tokens:
        filler = tokens.new_full((batch, max_new_tokens - length), pad)
        tokens = torch.cat([tokens, filler], dim=1)
    if eos_ids:
        is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    else:
        is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    finished = is_eos.any(dim=1)
    first_eos = torch.where(finished, is_eos.int().argmax(dim=1), torch.full_like(finished, max_new_tokens, dtype=torch.long))
    positions = torch.arange(max_new_tokens, device=tokens.device)
    tokens = torch.where(positions[None, :] < first_eos[:, None], tokens, torch.full_like(tokens, pad))
    return Generation(tokens=tokens, n_tokens=first_eos, finished=finished)
