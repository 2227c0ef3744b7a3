"""Several devices and nodes through Lightning strategies: checks of the requested set-up, and the strategy
settings the architecture table implies. No process management of our own.

- DDP: each rank holds the model; training sees the same global batches as one process
  (:class:`earlyexit.data.EpochSampler`) with the loss normalised over the global batch's tokens; when
  blocks are skipped (layer dropout) or exits rotate (curricula) some adapters get no gradient in a step,
  so unused parameters are looked for.
- FSDP: every decoder block (the table's block list) is one FSDP unit, with ``use_orig_params`` so the
  frozen base and the trainable LoRA weights can share a unit (in one dtype: see :func:`uniform_dtype`);
  checkpoints and the exported adapter hold full (gathered) adapter weights.
- Evaluation: the predict loop shards the examples without padding (see :mod:`earlyexit.evaluate`).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from earlyexit.errors import EarlyExitError

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def check_setup(accelerator, devices, strategy, num_nodes: int = 1) -> None:
    """Refuse, with one clear message, a device count or strategy this machine cannot run."""
    accelerator = str(accelerator or "auto")
    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and has_cuda)
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise EarlyExitError(f"trainer.accelerator {accelerator!r}: this machine has no CUDA GPU (use cpu)")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        have, what = (n_gpus, "GPU") if on_gpu else (os.cpu_count() or 1, "CPU core")
        if devices > have:
            raise EarlyExitError(f"trainer.devices {devices}: this machine has {have} {what}{'s' if have != 1 else ''}")
    if not isinstance(strategy, str):  # a class path (with init_args): checked by what it names
        path = strategy.get("class_path", "") if hasattr(strategy, "get") else getattr(strategy, "class_path", "")
        strategy = "fsdp" if "FSDP" in str(path) else "deepspeed" if "DeepSpeed" in str(path) else "auto"
    if strategy == "auto":
        return
    from lightning.pytorch.strategies import StrategyRegistry

    names = StrategyRegistry.available_strategies()
    if strategy not in names:
        common = [n for n in ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed_stage_2") if n in names]
        raise EarlyExitError(f"trainer.strategy {strategy!r} is not a Lightning strategy; for example: {', '.join(common)}")
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise EarlyExitError(f"trainer.strategy {strategy!r} needs the deepspeed package (pip install deepspeed), "
                             "which is not installed; ddp or fsdp need nothing more")
    if strategy.startswith("fsdp") and not on_gpu:
        raise EarlyExitError(f"trainer.strategy {strategy!r} runs on CUDA GPUs only; on CPUs use ddp")


def configure_strategy(strategy, module) -> None:
    """Settings the model implies, applied to a Trainer's strategy before ``fit`` (user-given settings win)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if "auto_wrap_policy" not in strategy.kwargs:
            strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({type(module.ee.blocks[0])})
        strategy.kwargs.setdefault("use_orig_params", True)  # frozen and trainable weights in one unit
        before = uniform_dtype(module)
        if before is not None:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"FSDP: LoRA adapters cast from {before} to the base weights' dtype "
                           f"({next(module.parameters()).dtype}); load the model in float32 to keep float32 adapters")
    elif isinstance(strategy, DDPStrategy) and module.varies_parameters():
        # Lightning keeps the DistributedDataParallel arguments here; a user's explicit choice is kept.
        strategy._ddp_kwargs.setdefault("find_unused_parameters", True)


def uniform_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """Give the trainable weights the frozen weights' dtype, if they differ; the dtype they had (None if unchanged).

    An FSDP unit flattens its weights into one tensor of one dtype, and a decoder block holds both the frozen
    base (bfloat16 when the model is loaded so) and peft's adapters (float32 by default). Giving each adapter a
    unit of its own would keep them float32 but costs a collective per adapter per pass (measured: 4× slower);
    load the model in float32 to keep float32 adapters (FSDP then computes in bfloat16 under bf16-mixed).
    """
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    trainable = [p for p in module.parameters() if p.requires_grad]
    if len(frozen) != 1 or not trainable:
        return None
    (dtype,) = frozen
    before = trainable[0].dtype
    if all(p.dtype == dtype for p in trainable):
        return None
    for p in trainable:
        p.data = p.data.to(dtype)
    return before


def clean_name(name: str) -> str:
    """A parameter name without the wrapper segments FSDP / activation checkpointing / compile insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_state_dict(trainer, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s full state dict; under FSDP gathered onto rank 0 (every rank must call; others get {})."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.state_dict()
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        state = trainer.model.state_dict()
    return {clean_name(k): v for k, v in state.items()}
