"""A results directory: the run's identity, the append-only generations, and the metric files.

Layout: ``run.json`` (what the generations depend on), ``config.yaml`` (the resolved config),
``generations.jsonl`` (one line per example × layer, appended batch by batch), ``metrics.json``,
``metrics.csv``, ``table.md`` and ``metrics.png``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from earlyexit.errors import EarlyExitError

GENERATIONS = "generations.jsonl"
RUN = "run.json"
LOCK = ".lock"


class ResultsDir:
    """Open (or create) a results directory for a run identified by ``fingerprint``, as its one writer.

    Refuses a directory that is not writable; one another live run is writing (a lock held for the life of the
    process, :meth:`close` releases it; a killed process's lock dies with it, so a killed run resumes); and one whose
    answers depended on different settings, so results are never mixed (a directory without answers takes the new
    fingerprint). An identical fingerprint resumes.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self._lock = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise EarlyExitError(f"results directory {str(self.path)!r} is not writable: {err.strerror}") from None
        self._lock = hold_lock(self.path / LOCK)
        self.generations_path = self.path / GENERATIONS
        run = self.path / RUN
        if run.is_file():
            before = json.loads(run.read_text())
            if before != fingerprint and self.generations():
                self.close()
                changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
                contents = [k[: -len("_content")] for k in changed if k.endswith("_content")]
                why = f"the {' and '.join(contents)} changed in content" if contents else "a different config"
                raise EarlyExitError(
                    f"results directory {str(self.path)!r} holds answers of other inputs ({why}; differs in: "
                    f"{', '.join(changed)}); choose another --out_dir or remove that directory"
                )
        if not run.is_file() or json.loads(run.read_text()) != fingerprint:  # atomically: a sharded run's ranks may race
            tmp = run.with_name(f"{RUN}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, run)
        for path in [self.generations_path, *self.rank_files()]:
            drop_torn_tail(path)

    def close(self) -> None:
        """Release the directory for another run now (the process's end does it anyway)."""
        if self._lock is not None:
            _HELD.pop((self.path / LOCK).resolve(), None)
            self._lock.close()
            self._lock = None

    def rank_files(self) -> list[Path]:
        """Per-rank generation files of a sharded run (merged into ``generations.jsonl`` when it ends)."""
        return sorted(self.path.glob("generations.rank*.jsonl"))

    def rank_path(self, rank: int) -> Path:
        return self.path / f"generations.rank{rank}.jsonl"

    def generations(self) -> list[dict]:
        """All generation rows so far, the last one per (id, layer) winning."""
        rows = {}
        for path in [self.generations_path, *self.rank_files()]:
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        rows[(row["id"], row["layer"])] = row
        return list(rows.values())

    def append(self, rows: list[dict], rank: int | None = None) -> None:
        """Append rows and make them durable before returning (a later kill loses nothing written).

        ``rank`` (sharded runs) writes that rank's own file, so processes never interleave their lines.
        """
        append_jsonl(self.generations_path if rank is None else self.rank_path(rank), rows)

    def merge_ranks(self) -> int:
        """Fold the per-rank files into ``generations.jsonl`` (one process, after every rank finished); rows moved."""
        moved = 0
        for path in self.rank_files():
            lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            append_jsonl(self.generations_path, lines)
            path.unlink()
            moved += len(lines)
        return moved

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        tmp = target.with_suffix(f"{target.suffix}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        return target

    def write_metrics(self, report: dict) -> None:
        self.write_text("metrics.json", json.dumps(report, indent=2) + "\n")
        columns = list(report["layers"][0]) if report["layers"] else []
        tmp = self.path / "metrics.csv.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in report["layers"]:
                writer.writerow([_flat(row[c]) for c in columns])
        os.replace(tmp, self.path / "metrics.csv")


def markdown_table(header: list, rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table: ``header``, then ``rows`` of cells (``str()`` of each); ``align`` has one letter
    per column, ``l`` or ``r`` (default: all left)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in (align or "l" * len(header))) + "|"
    lines = ["| " + " | ".join(map(str, header)) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def hold_lock(path: Path):
    """Hold the lock file ``path`` for this process (an open file with an exclusive ``flock``; the kernel drops it when
    the process ends, however it ends), with who holds it written inside; refuse in one line, naming the holder, when
    another process holds it. A process holds a lock until it ends (later runs in the same process share it). None where locks cannot be taken (no ``fcntl``), and for a sharded run's ranks after the
    first (the first holds it for them all)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    if any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
        return None
    key = path.resolve()
    if key in _HELD:  # this process holds it already (an earlier run in the same process, or a nested directory)
        return _HELD[key]
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read())
            who = (f"process {holder['pid']} on {holder['host']}, since {holder['since']}: "
                   f"{' '.join(holder['command'])[:160]}")
        except (ValueError, KeyError, TypeError):
            who = "another process"
        handle.close()
        raise EarlyExitError(f"results directory {str(path.parent)!r} is being written by another run ({who}); wait "
                             "for it to end, or choose another --out_dir") from None
    import socket
    import sys
    import time

    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    handle.flush()
    _HELD[key] = handle
    return handle


_HELD: dict[Path, object] = {}  # the results directories' locks this process holds, by path


def drop_torn_tail(path: Path) -> None:
    """A run killed mid-write can leave a partial last line: cut it so appends start on a clean line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines and fsync before returning."""
    if not rows:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def _flat(value):
    return ";".join(f"{v:.6g}" for v in value) if isinstance(value, (list, tuple)) else value
