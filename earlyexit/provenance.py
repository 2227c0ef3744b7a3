"""What a trained adapter was trained on, and whether the weight files a run reads are whole.

An adapter directory written by training holds ``base_model.json``: the base model's name, family, shapes and content
digest (:func:`earlyexit.identity.model_identity`). Loading the adapter checks it against the model it is loaded on and
refuses a mismatch in one line naming both models; a model of the same family and shapes but other weights (a
fine-tuned sibling, another revision) is refused too unless ``--model.other_base true`` asks for it, with a warning.
Adapters written before the record existed, or by other tools, are checked by their tensors' shapes.

Every weight file a run reads (adapters, exit adapters, probes, a tuned lens, checkpoints to resume, a model directory
and its cached conversion) is checked before anything loads: a safetensors file must hold every byte its header
promises, a torch file must be a whole zip archive. A broken one is named in one line.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

from earlyexit.errors import EarlyExitError

BASE = "base_model.json"
SHAPES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size")


def describe(record: dict) -> str:
    """``name (family, 30 layers, width 576)``."""
    shape = record.get("shape", {})
    return (f"{record.get('name')} ({record.get('model_type')}, {shape.get('num_hidden_layers')} layers, "
            f"width {shape.get('hidden_size')})")


def base_of(config, name: str, content: bool = True) -> dict:
    """The record of a base model: ``name``, family, shapes and (with ``content``) its content digest."""
    from earlyexit.identity import model_identity

    record = {"name": name, "model_type": config.model_type,
              "shape": {key: getattr(config, key) for key in SHAPES if getattr(config, key, None) is not None}}
    if content:
        record["content"] = model_identity(name)
    return record


def record_base(directory: str | Path, config, name: str) -> None:
    """Write ``base_model.json`` beside an adapter trained on model ``name`` (whose config is ``config``)."""
    target = Path(directory) / BASE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(base_of(config, name), indent=1) + "\n")


def check_base(directory: str | Path, config, name: str, other_base: bool = False) -> None:
    """Refuse loading the adapter in ``directory`` on model ``name`` (``config``) unless it was trained on a model of the
    same family and shapes and, unless ``other_base``, the same content."""
    path = Path(directory) / BASE
    if not path.is_file():
        return  # an adapter from before the record, or from another tool: its tensors' shapes are checked on loading
    try:
        trained = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EarlyExitError(f"adapter {str(directory)!r}: {BASE} is not readable ({type(err).__name__}: {err})") from None
    here = base_of(config, name, content=False)
    if trained.get("model_type") != here["model_type"] or trained.get("shape") != here["shape"]:
        raise EarlyExitError(f"adapter {str(directory)!r} was trained on {describe(trained)}; --model.name {describe(here)} "
                             "is another model: load the adapter with the model it was trained on")
    content = base_of(config, name)["content"]
    if trained.get("content") == content:
        return
    if not other_base:
        raise EarlyExitError(f"adapter {str(directory)!r} was trained on {trained.get('name')} ({trained.get('content')}); "
                             f"--model.name {name} has the same shapes but other weights ({content}): load it with the "
                             "model it was trained on, or set --model.other_base true to load it anyway")
    print(f"warning: adapter {directory} was trained on {trained.get('name')} ({trained.get('content')}), loaded on {name} "
          f"({content}) of the same shapes (--model.other_base)", file=sys.stderr)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def check_weights(path: str | Path, what: str, remedy: str = "write it again (or restore it) before using it") -> None:
    """Refuse a weight file that is not whole: a safetensors file shorter than its header says (or whose header does not
    parse), a torch file that is not a whole zip archive (torch's format since 1.6). ``what`` names it in the message,
    ``remedy`` says what to do."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if path.suffix == ".safetensors":
                head = f.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                if length < 0 or 8 + length > size:
                    raise _broken(path, what, f"its header is cut short ({size:,} bytes)", remedy)
                try:
                    header = json.loads(f.read(length))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    raise _broken(path, what, "its header does not parse", remedy) from None
                if 8 + length + end > size:
                    raise _broken(path, what, f"cut short ({size:,} of {8 + length + end:,} bytes)", remedy)
            elif path.suffix in (".pt", ".ckpt", ".bin") and f.read(2) == b"PK" and not zipfile.is_zipfile(path):
                raise _broken(path, what, f"cut short ({size:,} bytes: not a whole zip archive)", remedy)
    except OSError as err:
        raise EarlyExitError(f"{what} {str(path)!r} is not readable: {err.strerror}") from None


def check_weight_dir(directory: str | Path, what: str, **remedy) -> None:
    """:func:`check_weights` on every weight file directly in ``directory``."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            check_weights(path, what, **remedy)


def _broken(path: Path, what: str, why: str, remedy: str) -> EarlyExitError:
    return EarlyExitError(f"{what} {str(path)!r} is broken: {why}; {remedy}")
