"""A teacher cache: the base model's top-k next-token log-probabilities on every training example, computed once.

Self-distillation compares each exit with the base model's last layer. When the trunk trains (LoRA, full
fine-tuning) that teacher costs a second forward pass per step; on a fixed training set it can be computed once
instead and read with the batch (``data.teacher_cache``). Only the top k tokens per answer position are kept
(:class:`earlyexit.loss.SparseTeacher`; k = V keeps the exact teacher).

The file is one safetensors: ``ids`` ``[M, k]`` and ``logp`` ``[M, k]`` over all examples' answer positions in a row,
``offsets`` ``[n + 1]``, and in its metadata each example's key (the sha1 of its token ids and labels), so the cache
fits any order, shuffle or split of the same tokenised examples and refuses others.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.tokens import IGNORE_INDEX, pad, supervised_tokens


def example_key(example: dict) -> str:
    """What identifies a tokenised training example: the sha1 of its token ids and labels."""
    return hashlib.sha1(json.dumps([list(example["input_ids"]), list(example["labels"])]).encode()).hexdigest()


@torch.no_grad()
def build(ee, examples: list[dict], top_k: int, batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Top-k log-probabilities of ``ee``'s last layer at every answer position of ``examples`` (in order).

    Returns ``ids`` ``[M, k]`` (int32), ``logp`` ``[M, k]`` (float32) and the examples' keys.
    """
    device = next(ee.parameters()).device
    n = ee.n_layers
    ids_parts, logp_parts = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        input_ids = pad([e["input_ids"] for e in chunk], pad_id, "right").to(device)
        mask = pad([[1] * len(e["input_ids"]) for e in chunk], 0, "right").to(device)
        labels = pad([e["labels"] for e in chunk], IGNORE_INDEX, "right").to(device)
        hidden = ee.hidden_states(input_ids, mask, exit_layers=[n])[n]
        keep = labels[:, 1:] != IGNORE_INDEX
        states = hidden[:, :-1][keep]  # [m, D], row-major: example by example
        for piece in states.split(1024):
            logp = torch.log_softmax(ee.exit_logits(piece).float(), dim=-1)
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            ids_parts.append(top.indices.to(torch.int32).cpu())
            logp_parts.append(top.values.cpu())
    return torch.cat(ids_parts), torch.cat(logp_parts), [example_key(e) for e in examples]


def save(path: str | Path, ids: torch.Tensor, logp: torch.Tensor, keys: list[str], examples: list[dict], about: dict) -> None:
    """Write the cache; ``about`` (model, data options, k) is kept in the metadata for the record."""
    from safetensors.torch import save_file

    counts = [supervised_tokens(e) for e in examples]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    if int(offsets[-1]) != ids.shape[0]:
        raise EarlyExitError(f"teacher cache: {ids.shape[0]} positions for {int(offsets[-1])} answer tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids.contiguous(), "logp": logp.contiguous(), "offsets": offsets}, str(path),
              metadata={"keys": json.dumps(keys), "about": json.dumps(about)})


def load(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{example key: (ids [m, k], logp [m, k])}`` from a cache file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EarlyExitError(f"teacher cache {str(path)!r} not found (build it with scripts/teacher_cache.py)")
    from earlyexit.provenance import check_weights

    check_weights(path, "teacher cache", "build it again with scripts/teacher_cache.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            ids, logp, offsets = f.get_tensor("ids"), f.get_tensor("logp"), f.get_tensor("offsets").tolist()
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise EarlyExitError(f"teacher cache {str(path)!r} is not readable ({type(err).__name__}: {err})") from None
    return {key: (ids[offsets[i] : offsets[i + 1]], logp[offsets[i] : offsets[i + 1]]) for i, key in enumerate(keys)}
