"""The LightningModule: wires an exit-aware causal LM into Lightning's loops. The maths live elsewhere:
the loss and curricula in :mod:`earlyexit.loss`, exits in :mod:`earlyexit.model`, fast decoding in
:mod:`earlyexit.engine`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch

from earlyexit.adapters import ExitAdapters, attach, block_template
from earlyexit.errors import EarlyExitError, in_unit, non_negative, positive, require
from earlyexit.generation import GenerationArgs, example_seed
from earlyexit.loading import ModelArgs, load_model
from earlyexit.loss import (
    Curriculum,
    LossOutput,
    SparseTeacher,
    WeightScheme,
    accepted_per_cycle,
    active_exits,
    dropped_layers,
    early_exit_loss,
    exit_weights,
    layer_dropout_rates,
    pulled_teacher,
    top1_agreement,
)
from earlyexit.model import EarlyExitHead, ExitLayers, parse_exit_layers, unwrapped
from earlyexit.tokens import IGNORE_INDEX


@dataclass
class LoraArgs:
    """peft LoRA on the decoder (Hu et al., 2021).

    Args:
        r: rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input (unseeded: a resumed run then differs in its masks).
        target_modules: linear layers to adapt; the architecture table's (all attention and MLP projections) when None.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self):
        positive("lora.r", self.r)
        require(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        in_unit("lora.dropout", self.dropout, high_open=True)


@dataclass
class ExitAdapterArgs:
    """Exit adapters (:mod:`earlyexit.adapters`): a trainable map per exit in front of the shared norm and head.

    Args:
        exit_layers: exits that get an adapter: quarters, all, everyK or a list (the last layer never gets one).
        rank: affine: None for full D × D maps (as the tuned lens), r for low-rank maps; mlp: hidden width (4·D if None).
        kind: affine (``h + A h + b``, the tuned lens), mlp (``h + W2 silu(W1 LayerNorm(h))``, position-wise) or block
            (one decoder block shared by the exits, a copy of the last one, with attention over the exit's states:
            Kangaroo's adapter; the engine decodes it on its fast path, llama-style families).
    """

    exit_layers: ExitLayers = "all"
    rank: int | None = None
    kind: Literal["affine", "mlp", "block"] = "affine"

    def __post_init__(self):
        positive("exit_adapters.rank", self.rank, optional=True)


@dataclass
class ExitLossArgs:
    """The early-exit loss (LayerSkip) and its curriculum.

    Args:
        exit_layers: exits trained: quarters, all, everyK or a list; the last layer is always included.
        weights: per-exit weight: uniform, linear (l) or sum_l (1+…+l, LayerSkip's cumulative scale).
        e_scale: multiplier of every early exit's weight (below 1 protects the last layer).
        curriculum: none (all exits every step), rotational (every k-th exit, rotating each step) or gradual
            (exits enabled from the deepest to the shallowest).
        rotation: k of the rotational curriculum.
        gradual_interval: steps between two exits switched on by the gradual curriculum.
        distill: share α of self-distillation: each exit also matches the base model's final-layer
            distribution (adapters off), KL(base ‖ exit); 0 disables it.
        chunk_size: answer tokens per logits block (memory bound of the loss).
        fused: compute each exit's loss and its gradient in one pass over the head, chunk by chunk
            (:func:`earlyexit.loss.fused_exit_loss`: no head product recomputed in the backward pass); needs the
            head frozen. False: the checkpointed reference.
        pull: share β of exit ``pull_exit`` in the last layer's teacher (:func:`earlyexit.loss.pulled_teacher`):
            the last layer learns base^(1−β) · exit^β, the exit detached, so the two agree more often (speculative
            acceptance, dynamic exits) at some cost to the last layer. 0 disables it; needs ``distill`` > 0 and a
            teacher pass (not ``data.teacher_cache``).
        pull_exit: the exit the last layer is pulled towards; the shallowest trained early exit when None.
        exit_teacher: the early exits' distillation teacher: ``base`` (the base model's last layer) or ``last`` (the
            model's own last layer in the same step, detached: what self-speculation verifies with and a dynamic exit
            is judged against, once the trunk has moved). Needs ``distill`` > 0.
    """

    exit_layers: ExitLayers = "all"
    weights: WeightScheme = "sum_l"
    e_scale: float = 1.0
    curriculum: Curriculum = "none"
    rotation: int = 2
    gradual_interval: int = 100
    distill: float = 0.0
    chunk_size: int = 1024
    fused: bool = False
    pull: float = 0.0
    pull_exit: int | None = None
    exit_teacher: Literal["base", "last"] = "base"

    def __post_init__(self):
        non_negative("loss.e_scale", self.e_scale)
        positive("loss.rotation", self.rotation)
        positive("loss.gradual_interval", self.gradual_interval)
        in_unit("loss.distill", self.distill)
        positive("loss.chunk_size", self.chunk_size)
        in_unit("loss.pull", self.pull)
        positive("loss.pull_exit", self.pull_exit, optional=True)
        if self.pull > 0 and self.distill <= 0:
            raise EarlyExitError(f"loss.pull = {self.pull} changes the last layer's distillation teacher: set loss.distill > 0")
        if self.exit_teacher not in ("base", "last"):
            raise EarlyExitError(f"loss.exit_teacher {self.exit_teacher!r}: choose base or last")
        if self.exit_teacher == "last" and self.distill <= 0:
            raise EarlyExitError("loss.exit_teacher last is a distillation teacher: set loss.distill > 0")


@dataclass
class LayerDropoutArgs:
    """LayerSkip's layer dropout: block l is skipped in training with probability p_max · D(l).

    Args:
        p_max: skip probability of the last block (0 disables layer dropout).
        scale: how D rises with depth: exp, linear or uniform. Block 1 is never skipped.
        seed: seed of the per-step draws.
    """

    p_max: float = 0.0
    scale: Literal["exp", "linear", "uniform"] = "exp"
    seed: int = 0

    def __post_init__(self):
        in_unit("layer_dropout.p_max", self.p_max)


@dataclass
class OptimArgs:
    """AdamW with linear warm-up and cosine decay.

    Args:
        lr: peak learning rate.
        adapter_lr: peak learning rate of the exit adapters when they train beside LoRA (``lr`` when None).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear warm-up from 0.
        min_lr_ratio: final learning rate as a share of the peak.
    """

    lr: float = 2e-4
    adapter_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "> 0")
        require(self.adapter_lr is None or self.adapter_lr > 0, "optim.adapter_lr", self.adapter_lr, "> 0")
        non_negative("optim.weight_decay", self.weight_decay)
        non_negative("optim.warmup_steps", self.warmup_steps)
        in_unit("optim.min_lr_ratio", self.min_lr_ratio)


PULL_REFUSAL = ("loss.pull needs the teacher's full distribution (a teacher pass): drop data.teacher_cache, or set "
                "loss.pull 0")


def pull_exit_of(loss: ExitLossArgs, train_exits: list[int], n_layers: int) -> int | None:
    """The exit the last layer's teacher is pulled towards (``loss.pull``), None when it is off: ``loss.pull_exit``, or
    the shallowest trained early exit. Refused when it is not a trained early exit."""
    if loss.pull <= 0:
        return None
    early = [layer for layer in train_exits if layer < n_layers]
    exit_ = loss.pull_exit if loss.pull_exit is not None else (early[0] if early else None)
    if exit_ not in early:
        raise EarlyExitError(f"loss.pull_exit {exit_} is not one of the trained early exits {early} (loss.exit_layers)")
    return exit_


FUSED_REFUSAL = ("loss.fused needs the output head frozen and a plain linear layer (it is trained or wrapped here: "
                 "drop it from model.lora's targets, or set loss.fused false)")


class EarlyExitModule(L.LightningModule):
    """A causal LM with exits: early-exit LoRA training, and per-exit generation in ``predict_step``.

    Args:
        base: which model to load (HF id, local directory, or the embedded SmolLM2).
        lora: the adapters that train (only they do); None loads the model without adapters (prediction).
        exit_adapters: a trainable map per exit in front of the shared norm and head (with ``lora`` None and
            ``full_finetune`` false, the only thing that trains).
        full_finetune: train every decoder block's own weights (LayerSkip's full-parameter recipe; the embeddings,
            final norm and head stay frozen); needs ``lora`` None. The distillation teacher is then a frozen copy of
            the model as loaded (the model's memory twice).
        loss: the early-exit loss and curriculum.
        layer_dropout: LayerSkip layer dropout.
        optim: optimiser and schedule.
        gradient_checkpointing: recompute block activations in the backward pass (less memory, ~30% slower).
        compile_blocks: during ``fit``, run each decoder block through ``torch.compile``
            (:meth:`earlyexit.model.EarlyExitHead.compiled_blocks`); prediction stays eager.
        generation: decoding options for ``predict``.
        exit_layers: exits decoded by ``predict``: quarters, all, everyK or a list.
    """

    def __init__(
        self,
        base: ModelArgs = ModelArgs(),
        lora: LoraArgs | None = None,
        exit_adapters: ExitAdapterArgs | None = None,
        full_finetune: bool = False,
        loss: ExitLossArgs = ExitLossArgs(),
        layer_dropout: LayerDropoutArgs = LayerDropoutArgs(),
        optim: OptimArgs = OptimArgs(),
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        generation: GenerationArgs = GenerationArgs(),
        exit_layers: ExitLayers = "quarters",
    ):
        super().__init__()
        base, lora, adapters, loss, layer_dropout, optim, generation = (
            _coerce(cls, value) for cls, value in ((ModelArgs, base), (LoraArgs, lora), (ExitAdapterArgs, exit_adapters),
                                                   (ExitLossArgs, loss), (LayerDropoutArgs, layer_dropout), (OptimArgs, optim),
                                                   (GenerationArgs, generation))
        )
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "base": asdict(base), "lora": asdict(lora) if lora else None,
            "exit_adapters": asdict(adapters) if adapters else None, "full_finetune": full_finetune, "loss": asdict(loss),
            "layer_dropout": asdict(layer_dropout),
            "optim": asdict(optim), "gradient_checkpointing": gradient_checkpointing, "compile_blocks": compile_blocks,
            "generation": asdict(generation),
            "exit_layers": exit_layers,
        })
        if full_finetune and lora is not None:
            raise EarlyExitError("model.full_finetune trains the blocks' own weights: set model.lora null")
        self.lm, self.tokenizer = load_model(base)
        template = block_template(self.lm) if adapters is not None and adapters.kind == "block" else None
        self.teacher_lm = None
        """Full fine-tuning with distillation: a frozen copy of the model as loaded, the teacher."""
        if lora is not None:
            self.lm = wrap_lora(self.lm, lora)
        else:  # only what is asked for trains: the blocks (full fine-tuning), the exit adapters, or nothing
            self.lm.requires_grad_(False)
            if full_finetune:
                if loss.distill > 0:
                    import copy

                    self.teacher_lm = copy.deepcopy(self.lm).eval()
                EarlyExitHead(self.lm).blocks.requires_grad_(True)
        if adapters is not None:
            n = EarlyExitHead(self.lm).n_layers
            layers = [layer for layer in parse_exit_layers(adapters.exit_layers, n) if layer < n]
            attach(self.lm, ExitAdapters(layers, self.lm.config.hidden_size, adapters.rank, adapters.kind, template))
        self.frozen_trunk = lora is None and not full_finetune
        self.full_finetune = full_finetune
        if loss.distill > 0 and not (hasattr(self.lm, "disable_adapter") or adapters is not None or full_finetune):
            raise EarlyExitError("loss.distill needs something that trains the exits (model.lora, model.exit_adapters or "
                                 "model.full_finetune): the teacher is the model's own final layer")
        if loss.pull > 0 and self.frozen_trunk:
            raise EarlyExitError("loss.pull moves the last layer, which only trains with the trunk: set model.lora or "
                                 "model.full_finetune, or loss.pull 0")
        if gradient_checkpointing:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ee = EarlyExitHead(self.lm)
        if loss.fused and self.ee.linear_head() is None:  # refused now, before any work
            raise EarlyExitError(FUSED_REFUSAL)
        self.compiled_training = compile_blocks
        n = self.ee.n_layers
        self.generation = generation
        self.exit_layers = parse_exit_layers(exit_layers, n) if generation.exit == "fixed" else [n]
        if generation.exit == "dynamic":
            if generation.do_sample or not generation.engine:
                raise EarlyExitError("generation.exit dynamic decodes greedily through the engine: "
                                     "set generation.do_sample false and generation.engine true")
            self.ee.check_layer(generation.min_layer_of(n))
            generation.check_layers_of(n)  # listed check layers must lie below the last
        self._engine = None
        self.train_exits = sorted(set(parse_exit_layers(loss.exit_layers, n)) | {n})
        self.pull_exit = pull_exit_of(loss, self.train_exits, n)
        self.dropout_rates = layer_dropout_rates(n, layer_dropout.p_max, layer_dropout.scale)
        self.loss_args, self.dropout_args, self.optim_args = loss, layer_dropout, optim
        self.strict_loading = False  # checkpoints hold the trainable (adapter) weights only
        self.done: dict[int, set[int]] = {}
        """Example id → layers already generated (a resumed prediction skips them); see :meth:`resume_from`."""

    # --- training -------------------------------------------------------------------------------------

    def _loss(self, batch: dict, step: int, train: bool) -> tuple[LossOutput, dict[int, torch.Tensor]]:
        """The early-exit loss of ``batch`` at ``step``, and the block outputs it was computed from."""
        n = self.ee.n_layers
        la = self.loss_args
        exits = active_exits(step, self.train_exits, n, la.curriculum, la.rotation, la.gradual_interval) if train else self.train_exits
        skip = dropped_layers(step, self.dropout_rates, self.dropout_args.seed) if train else set()
        read = sorted(set(exits) | ({self.pull_exit} if self.pull_exit is not None else set()))
        hidden = self.ee.hidden_states(batch["input_ids"], batch.get("attention_mask"), exit_layers=read, skip=skip,
                                       position_ids=batch.get("position_ids"))
        if la.distill <= 0:
            teacher = None
        elif "teacher_ids" in batch:  # a teacher cache: no teacher pass
            teacher = SparseTeacher(batch["teacher_ids"], batch["teacher_logp"])
        else:
            teacher = self._teacher(batch, hidden if self.frozen_trunk and not skip else None)
        if teacher is not None and (self.pull_exit is not None or la.exit_teacher == "last"):
            last = teacher
            if self.pull_exit is not None:
                if isinstance(teacher, SparseTeacher):
                    raise EarlyExitError(PULL_REFUSAL)
                last = pulled_teacher(teacher, self._exit_logp(batch, hidden, self.pull_exit), la.pull)
            if la.exit_teacher == "last":
                teacher = self._exit_logp(batch, hidden, n)
            teacher = {layer: teacher for layer in exits} | {n: last}
        weights = exit_weights(exits, n, la.weights, la.e_scale)
        out = early_exit_loss(hidden, batch["labels"], self.ee.exit_logits, weights, teacher, la.distill, la.chunk_size,
                              tokens=self._tokens_per_rank(batch), fused=self._fused_head())
        return out, hidden

    def _fused_head(self):
        """The head split for the fused loss when ``loss.fused`` is on (refused if the head trains or is adapted)."""
        if not self.loss_args.fused:
            return None
        head = self.ee.linear_head()
        if head is None:
            raise EarlyExitError(FUSED_REFUSAL)
        return head

    def _world(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def _tokens_per_rank(self, batch: dict) -> torch.Tensor | None:
        """Answer tokens of the global batch / world size (None in one process): the loss normaliser under DDP/FSDP."""
        if self._world() == 1:
            return None
        local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        return self.trainer.strategy.reduce(local, reduce_op="sum") / self.trainer.world_size

    @torch.no_grad()
    def _teacher(self, batch: dict, hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``[M, V]`` log-probabilities of the base model's final layer at the answer positions.

        ``hidden``: the training pass's block outputs when they are the base model's own (a frozen trunk, no block
        skipped): its last layer is the teacher and no second forward runs. Otherwise one forward with the LoRA
        adapters off, or through the frozen copy of full fine-tuning.
        """
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        n = self.ee.n_layers
        if hidden is not None:
            return self._log_probs(self.ee, hidden[n][:, :-1][keep].detach())
        ee = self.ee if self.teacher_lm is None else EarlyExitHead(self.teacher_lm)
        off = self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()
        with off:
            hidden = ee.hidden_states(batch["input_ids"], batch.get("attention_mask"), exit_layers=[n],
                                      position_ids=batch.get("position_ids"))
            return self._log_probs(ee, hidden[n][:, :-1][keep])

    @torch.no_grad()
    def _log_probs(self, ee: EarlyExitHead, states: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``[M, V]`` float32 log-probabilities of ``states`` ``[M, D]`` read through exit ``layer`` (None: the last
        layer's norm and head), one chunk of rows at a time into one buffer: no ``[M, V]`` logits or copies beside it
        (Gemma 3's 262k-token vocabulary makes each such block several GB at a training batch)."""
        out = None
        for start in range(0, states.shape[0], self.loss_args.chunk_size):
            logits = ee.exit_logits(states[start : start + self.loss_args.chunk_size], layer)  # [chunk, V]
            if out is None:
                out = torch.empty(states.shape[0], logits.shape[-1], dtype=torch.float32, device=logits.device)
            out[start : start + logits.shape[0]] = torch.log_softmax(logits.float(), dim=-1)
        return out if out is not None else ee.exit_logits(states, layer).float()  # no rows: [0, V]

    @torch.no_grad()
    def _exit_logp(self, batch: dict, hidden: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """``[M, V]`` log-probabilities of exit ``layer`` of the model being trained at the answer positions, detached."""
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        return self._log_probs(self.ee, hidden[layer][:, :-1][keep].detach(), layer)

    def on_fit_start(self) -> None:
        if self.hparams["gradient_checkpointing"]:
            self._checkpoint_blocks()
        if self.compiled_training:
            self.ee.compile_blocks()

    def _checkpoint_blocks(self) -> None:
        """Gradient checkpointing acts only on a block in train mode (HF checks the block's own flag), but the model is
        loaded for inference, in eval mode, and Lightning's fit leaves it so: checkpointing was silently off. The
        blocks themselves get train mode; the modules inside them keep theirs, so the frozen trunk's own dropout
        stays off. Validation switches everything to eval mode and back."""
        for block in self.ee.blocks:
            unwrapped(block).training = True

    def on_fit_end(self) -> None:
        if self.compiled_training:
            self.ee.compile_blocks(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out, _ = self._loss(batch, self.global_step, train=True)
        if not torch.isfinite(out.total):
            raise EarlyExitError(f"the training loss is {out.total.item()} at step {self.global_step} "
                                 "(lower optim.lr, or check the data); the last checkpoint is intact")
        sync = self._world() > 1  # the mean over ranks is the global batch's loss
        self.log("train/loss", out.total, prog_bar=True, sync_dist=sync)
        for layer, ce in out.per_exit.items():
            self.log(f"train/ce_exit_{layer}", ce, sync_dist=sync)
        return out.total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out, hidden = self._loss(batch, self.global_step, train=False)
        sync = self._world() > 1
        self.log("val/loss", out.total, prog_bar=True, sync_dist=sync)
        for layer, ce in out.per_exit.items():
            self.log(f"val/ce_exit_{layer}", ce, sync_dist=sync)
        # what decoding needs of an exit: how often its top-1 token is the final layer's (and the drafts that keeps)
        agreement = top1_agreement(hidden, batch["labels"], self.ee.exit_logits, self.ee.n_layers, self.loss_args.chunk_size)
        for layer, share in agreement.items():
            self.log(f"val/top1_agree_exit_{layer}", share, sync_dist=sync)
            self.log(f"val/accepted_per_cycle_d4_exit_{layer}", accepted_per_cycle(float(share), 4), sync_dist=sync)

    def configure_optimizers(self):
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise EarlyExitError("nothing to train: configure LoRA adapters (model.lora), exit adapters (model.exit_adapters) "
                                 "or model.full_finetune")
        oa = self.optim_args
        adapters = [p for name, p in named if "exit_adapters." in name]
        rest = [p for name, p in named if "exit_adapters." not in name]
        groups = [{"params": group, "lr": lr} for group, lr in ((rest, oa.lr), (adapters, oa.adapter_lr or oa.lr)) if group]
        optimizer = torch.optim.AdamW(groups, lr=oa.lr, weight_decay=oa.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, oa.warmup_steps, oa.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP, clip by norm with FSDP's own ``clip_grad_norm_`` (the norm over all shards); as usual elsewhere."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise EarlyExitError(f"gradient_clip_algorithm {gradient_clip_algorithm!r} under FSDP: only 'norm' is supported")
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from earlyexit.distributed import clean_name

        trainable = {clean_name(name) for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if clean_name(k) in trainable}

    def varies_parameters(self) -> bool:
        """Whether some trainable parameters may get no gradient in a step (skipped blocks, rotating exits)."""
        return any(self.dropout_rates) or self.loss_args.curriculum != "none"

    # --- prediction -----------------------------------------------------------------------------------

    @property
    def engine(self):
        """The decoding engine (built on first use, once the model sits on its device)."""
        from earlyexit.engine import Engine

        if self._engine is None:
            gen = self.generation
            self._engine = Engine(self.ee, compile=gen.compile, fast=gen.fast, compile_mode=gen.compile_mode)
        return self._engine

    def resume_from(self, rows: list[dict]) -> None:
        """Generation rows already written (``id``, ``layer``): ``predict_step`` skips those (example, exit) pairs."""
        self.done = {}
        for row in rows:
            self.done.setdefault(row["id"], set()).add(row["layer"])

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[dict]:
        """One row per (example, exit layer) not yet done: id, layer, text, tokens, n_tokens, finished
        (and, for dynamic exits, each token's exit layer)."""
        gen = self.generation
        todo: dict[tuple[int, ...], list[int]] = {}  # the exits still missing → the examples missing them
        for i, ex in enumerate(batch["ids"]):
            missing = tuple(layer for layer in self.exit_layers if layer not in self.done.get(ex, ()))
            if missing:
                todo.setdefault(missing if gen.engine else (), []).append(i)
        rows = []
        for layers, members in todo.items():
            input_ids, mask = batch["input_ids"][members], batch["attention_mask"][members]
            first = int(mask.any(0).int().argmax())  # drop columns that are padding in every kept row
            input_ids, mask = input_ids[:, first:], mask[:, first:]
            for layer, kept, out in self._decode(batch, members, layers, input_ids, mask):
                rows += self._rows(batch, kept, layer, out)
        return rows

    def _decode(self, batch, members: list[int], layers: tuple[int, ...], input_ids, mask):
        """``(layer, batch indices, Generation)`` for the examples ``members`` of ``batch``, missing ``layers``."""
        gen, pad = self.generation, self.tokenizer.pad_token_id
        if gen.exit == "dynamic":
            yield self.ee.n_layers, members, self.engine.generate_dynamic(input_ids, mask, gen, pad_token_id=pad)
        elif gen.engine:
            if gen.do_sample:
                torch.manual_seed(example_seed(gen.seed, batch["ids"][members[0]]))
            for layer, out in self.engine.generate(input_ids, mask, list(layers), gen, pad_token_id=pad).items():
                yield layer, members, out
        else:  # the reference path: the model's own generate, once per exit
            for layer in self.exit_layers:
                keep = [row for row, i in enumerate(members) if layer not in self.done.get(batch["ids"][i], ())]
                if not keep:
                    continue
                if gen.do_sample:
                    torch.manual_seed(example_seed(gen.seed, batch["ids"][members[keep[0]]], layer))
                out = self.ee.generate(input_ids[keep], mask[keep], layer, gen, pad_token_id=pad)
                yield layer, [members[row] for row in keep], out

    def _rows(self, batch, indices: list[int], layer: int, out) -> list[dict]:
        rows = []
        for row, i in enumerate(indices):
            n = int(out.n_tokens[row])
            tokens = out.tokens[row, :n].tolist()
            entry = {
                "id": batch["ids"][i],
                "layer": layer,
                "text": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "n_tokens": n,
                "finished": bool(out.finished[row]),
                "tokens": tokens,
            }
            if getattr(out, "layers", None) is not None:
                entry["layers"] = out.layers[row, :n].tolist()  # each token's exit layer (dynamic exits)
            rows.append(entry)
        return rows


def _coerce(cls, value):
    """A dataclass argument given as a dict (a checkpoint's hyperparameters) becomes the dataclass."""
    if value is None and cls not in (LoraArgs, ExitAdapterArgs):  # those two are optional: None means none
        return cls()
    return cls(**value) if isinstance(value, dict) else value


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wrap_lora(model, lora: LoraArgs):
    """Wrap ``model`` with peft LoRA; a target name the model does not have is a clear error."""
    from peft import LoraConfig, get_peft_model

    from earlyexit.arch import spec_for

    targets = list(lora.target_modules or spec_for(model.config.model_type).lora_targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise EarlyExitError(f"LoRA target {missing[0]!r} is not a module of this {model.config.model_type} model; "
                             f"the table's targets are {', '.join(spec_for(model.config.model_type).lora_targets)}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
