"""Prompts against the model's window (``generation.context``): a prompt whose tokens and the answer's
``max_new_tokens`` do not fit the model's positions is refused in one line, before any work starts, or cut from the
left (its last tokens kept) with a warning that counts the tokens dropped. Every command that decodes prompts (evaluate,
judge, lens, bench, the server) goes through :func:`fit_prompts`.
"""

from __future__ import annotations

import sys
from typing import Literal

from earlyexit.errors import EarlyExitError

Context = Literal["refuse", "truncate"]


def window_of(config) -> int | None:
    """The model's positions (``max_position_embeddings``; GPT-2's ``n_positions`` answers to that name), or None."""
    window = getattr(config, "max_position_embeddings", None)
    return window if isinstance(window, int) and window > 0 else None


def fit_prompts(prompts: list[list[int]], window: int | None, max_new_tokens: int, policy: Context,
                what: str = "prompt", option: str = "generation.context") -> list[list[int]]:
    """``prompts`` (token ids) that fit ``window`` with ``max_new_tokens`` new tokens each: unchanged when they fit;
    else refused in one line (``policy`` refuse; the line names ``option``) or cut to their last ``window −
    max_new_tokens`` tokens with a warning (truncate). No window: unchanged."""
    if window is None:
        return prompts
    room = window - max_new_tokens
    if room < 1:
        raise EarlyExitError(f"generation.max_new_tokens = {max_new_tokens} leaves no room for a {what} in the model's "
                             f"window of {window} tokens")
    long = [len(ids) for ids in prompts if len(ids) > room]
    if not long:
        return prompts
    if policy == "refuse":
        raise EarlyExitError(f"{len(long)} {what}(s) do not fit the model's window of {window} tokens with "
                             f"max_new_tokens {max_new_tokens} (the longest has {max(long)} tokens; {room} fit): set "
                             f"{option} truncate to keep the last {room} tokens of each, or shorten them")
    print(f"warning: {len(long)} {what}(s) cut from the left to their last {room} tokens to fit the model's window of "
          f"{window} with max_new_tokens {max_new_tokens}: {sum(long) - room * len(long)} tokens dropped", file=sys.stderr)
    return [ids[-room:] if len(ids) > room else ids for ids in prompts]
