"""One command-line convention for every entry point and script.

Options come from typed signatures and dataclasses (jsonargparse), so ``--help`` lists every option with its
default and docstring; every command takes ``--config FILE.yaml`` (keys as ``--print_config`` writes them) and
``--print_config``, and writes its resolved config beside its outputs (``config.yaml``), or to stderr when it has
none. Bad values stop the command with one ``error:`` line and exit status 2 (:func:`earlyexit.errors.report_errors`).
The same thing is named the same way everywhere: ``--model.name``, ``--model.adapter``, ``--generation.*``,
``--data.source``; the training command, whose ``model:`` is the LightningModule, reads ``--model.base.name``.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from earlyexit.errors import EarlyExitError, report_errors


def make_parser(prog: str, doc: str | None) -> ArgumentParser:
    """A parser with ``--config`` (and so ``--print_config``); the description is the first paragraph of ``doc``."""
    parser = ArgumentParser(prog=prog, description=(doc or "").strip().split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML of these options (as --print_config writes them)")
    return parser


def dump(parser: ArgumentParser, cfg: Namespace) -> str:
    """The resolved config as YAML, without the ``--config`` bookkeeping."""
    cfg = cfg.clone()
    if "config" in cfg:
        del cfg["config"]
    return parser.dump(cfg, skip_none=False, skip_check=True)


def save_config(parser: ArgumentParser, cfg: Namespace, directory: str | Path | None) -> Path | None:
    """Write the resolved config to ``directory/config.yaml`` (atomically); without a directory, print it to stderr."""
    text = dump(parser, cfg)
    if directory is None:
        print(f"# resolved config\n{text}", file=sys.stderr)
        return None
    target = Path(directory) / "config.yaml"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"config.yaml.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        raise EarlyExitError(f"cannot write {target}: {err.strerror}") from None
    return target


def run_function(fn: Callable[..., Any], prog: str, argv: list[str] | None = None, out_dir: str = "out_dir") -> Any:
    """The typed signature of ``fn`` as the command line (scripts): parse, save the resolved config into the
    argument named ``out_dir`` when ``fn`` has one and it is set (else print it), and call ``fn``."""

    @report_errors
    def main() -> Any:
        parser = make_parser(prog, fn.__doc__)
        parser.add_function_arguments(fn, as_group=False)
        cfg = parser.parse_args(argv)
        save_config(parser, cfg, cfg.get(out_dir))
        init = parser.instantiate_classes(cfg)
        return fn(**{name: init.get(name) for name in inspect.signature(fn).parameters})

    return main()


def run_subcommands(functions: dict[str, Callable[..., Any]], prog: str, doc: str | None,
                    argv: list[str] | None = None) -> Any:
    """Like :func:`run_function`, with one subcommand per function (``prog NAME --option …``)."""

    @report_errors
    def main() -> Any:
        parser = make_parser(prog, doc)
        commands = parser.add_subcommands(dest="command")
        for name, fn in functions.items():
            sub = make_parser(name, fn.__doc__)
            sub.add_function_arguments(fn, as_group=False)
            commands.add_subcommand(name, sub, help=(fn.__doc__ or "").strip().split("\n")[0])
        cfg = parser.parse_args(argv)
        name = cfg.command
        save_config(parser, cfg, cfg[name].get("out_dir"))
        init = parser.instantiate_classes(cfg)[name]
        return functions[name](**{k: init.get(k) for k in inspect.signature(functions[name]).parameters})

    return main()
