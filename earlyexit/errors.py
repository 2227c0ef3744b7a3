"""User-facing errors and the one place that turns them into a clear message and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class EarlyExitError(Exception):
    """A problem with the user's input (path, config, data, layer choice): reported without a traceback."""


def report_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a CLI entry point: known input errors print one line to stderr and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (EarlyExitError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            if not isinstance(err, MisconfigurationException):  # a Trainer set-up the machine cannot run: devices, strategy …
                raise
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            sys.exit(2)

    return wrapper
