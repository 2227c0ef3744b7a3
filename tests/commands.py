"""Running the commands in tests: in this process (fast; every refusal case), or as a real process (once a command:
what a user sees, traceback-free)."""

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_command(name: str, argv: list[str], monkeypatch) -> int:
    """Run an entry point (``earlyexit.NAME``) or a script (``scripts/NAME``) in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        if name.endswith(".py"):
            runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")
        else:
            __import__(f"earlyexit.{name}", fromlist=["main"]).main(argv)
    except SystemExit as stop:
        return stop.code or 0
    return 0


def refusal(name: str, argv: list[str], monkeypatch, capsys) -> str:
    """Run command ``name`` in this process: it must stop with status 2 and an ``error:`` line last; that line."""
    code = run_command(name, argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    return last


def refusal_process(module: str, argv: list[str], env: dict | None = None) -> str:
    """Run ``python -m MODULE`` as a real process: it must stop with status 2, no traceback, an ``error:`` line last;
    that line."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    return last
