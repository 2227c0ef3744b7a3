"""Token sequences: the label that takes no loss, the positions that do, and padding to a batch."""

from __future__ import annotations

from typing import Literal

import torch

IGNORE_INDEX = -100
"""The label of a position the loss skips (the prompt, padding): PyTorch's and Hugging Face's convention."""


def supervised_tokens(example: dict) -> int:
    """Tokens the loss is taken on: labels at positions 1.. that are not ``IGNORE_INDEX``."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def pad(sequences: list[list[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    """``[B, T_max]`` tensor of the sequences padded with ``value`` on ``side``."""
    width = max(len(seq) for seq in sequences)
    rows = [
        ([value] * (width - len(seq)) + list(seq)) if side == "left" else (list(seq) + [value] * (width - len(seq)))
        for seq in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)
