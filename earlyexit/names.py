"""What a model name stands for: a catalog model (joined and converted once into the cache), a seeded tiny random
model, a local directory or a hub id; resolved to a path ``from_pretrained`` takes, or one clear error."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from earlyexit.catalog import CATALOG, materialize, publish
from earlyexit.errors import EarlyExitError
from earlyexit.network import hub_offline, offline_miss, require_hub

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models are cached: ``$EARLYEXIT_CACHE`` or ``./checkpoints``."""
    return Path(os.environ.get("EARLYEXIT_CACHE", "checkpoints"))


TINY_PREFIX = "tiny-random-"
RANDOM_PREFIX = "random-shape-"


def materialize_tiny(name: str) -> str:
    """``tiny-random-<model_type>``: a seeded 4-layer random model (< 1M parameters), saved once to the cache."""
    from earlyexit.tiny import TINY_CONFIGS, save_tiny

    model_type = name[len(TINY_PREFIX) :]
    if model_type not in TINY_CONFIGS:
        raise EarlyExitError(f"no tiny model {name!r}; choose from {', '.join(TINY_PREFIX + t for t in sorted(TINY_CONFIGS))}")
    target = cache_root() / name
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            save_tiny(staging, model_type)
            publish(staging, target, "config.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _looks_like_path(name: str) -> bool:
    """HF ids are ``name`` or ``org/name``; anything else that does not exist is a missing local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve_model_path(name: str) -> str:
    """Map ``name`` to something ``from_pretrained`` takes; fail clearly for a missing local path."""
    if name in CATALOG:
        return str(materialize(name, cache_root()))
    if name.startswith(TINY_PREFIX):
        return materialize_tiny(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EarlyExitError(f"model directory {name!r} has no config.json")
        return str(path)
    if _looks_like_path(name):
        raise EarlyExitError(f"model path {name!r} does not exist")
    if not in_hub_cache(name):
        instead = f"--model.name {DEFAULT_MODEL} (embedded), tiny-random-llama, or a local directory"
        if hub_offline():
            raise offline_miss(f"model {name!r}", instead)
        require_hub(f"model {name!r}", instead)
    return name


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (then loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False
