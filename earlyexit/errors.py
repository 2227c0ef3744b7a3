"""User-facing errors and the one place that turns them into a clear message and a non-zero exit."""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class EarlyExitError(Exception):
    """A problem with the user's input (path, config, data, layer choice): reported without a traceback."""


def report_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a CLI entry point: known input errors print one line to stderr and exit with status 2; so do the parser's
    own (a value of the wrong type: one line naming the key, the value and the type wanted)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        one_line_parser_errors()
        try:
            return main(*args, **kwargs)
        except Exception as err:
            known = user_error(err)
            if known is None:
                raise
            print(f"error: {' '.join(str(known).split())}", file=sys.stderr)
            sys.exit(2)

    return wrapper


USER_ERRORS = (EarlyExitError, FileNotFoundError, NotADirectoryError, PermissionError)


def user_error(err: BaseException | None) -> BaseException | None:
    """The user-facing error behind ``err``, if any: itself or one it was raised from. Parsers (jsonargparse)
    wrap what an option's ``__post_init__`` raised in errors of their own; the user wants the inner line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # a Trainer set-up the machine cannot run

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (*USER_ERRORS, MisconfigurationException)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def require(ok: bool, option: str, value, allowed: str) -> None:
    """Refuse a bad option value with one line naming the option and its allowed range.

    Called from the ``__post_init__`` / ``__init__`` that declares the option, so every command checks it
    before any model loads.
    """
    if not ok:
        raise EarlyExitError(f"{option} = {value!r} is out of range: it must be {allowed}")


def positive(option: str, value, optional: bool = False) -> None:
    """An integer ≥ 1 (None too when ``optional``)."""
    if optional and value is None:
        return
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, option, value, "an integer ≥ 1")


def non_negative(option: str, value) -> None:
    """A number ≥ 0."""
    require(value >= 0, option, value, "≥ 0")


def in_unit(option: str, value, low_open: bool = False, high_open: bool = False) -> None:
    """A number in [0, 1], with either end open."""
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    require(ok, option, value, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def parser_message(message: str) -> str:
    """jsonargparse's error as one line: ``Parser key "k":\n  Expected a <class 'int'>. Got value: one`` becomes
    ``k = 'one': expected an integer``."""
    text = " ".join(message.split())
    found = re.fullmatch(r'Parser key "([^"]+)": Expected a (.+?)\. Got value: (.*)', text)
    if not found:
        return text if len(text) <= 400 else text[:400].rsplit(" ", 1)[0] + " …"
    key, expected, value = found.groups()
    return f"{key} = {value!r}: expected {_describe(expected)}"


def _describe(expected: str) -> str:
    simple = {"<class 'int'>": "an integer", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
              "<class 'str'>": "a string"}
    if expected in simple:
        return simple[expected]
    choices = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
    if choices:
        return "one of " + ", ".join(choice.strip().strip("'\"") for choice in choices.group(1).split(","))
    return expected


def one_line_parser_errors() -> None:
    """Make every jsonargparse parser (ours and LightningCLI's) end a parse error with one line (:func:`parser_message`)."""
    import jsonargparse

    parser = jsonargparse.ArgumentParser
    if getattr(parser.error, "one_line", False):
        return
    original = parser.error

    def error(self, message: str, ex: Exception | None = None):
        return original(self, parser_message(message), ex)

    error.one_line = True
    parser.error = error
