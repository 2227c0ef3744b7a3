"""What a run reads, identified by content rather than by path.

A results directory records these digests in ``run.json``; an adapter retrained in place, an edited data file
or a replaced model then changes the run's identity, and the old directory is refused instead of its answers
being scored again. Digests of large files are remembered by ``(path, size, mtime)`` in
``<cache>/digests.json`` so that a 13 GB model is read once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 24


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, remembered by (absolute path, size, mtime) across runs."""
    from earlyexit.names import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_root() / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    memo[key] = digest.hexdigest()
    try:  # best effort: a read-only cache only costs a re-hash next time
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"digests.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass
    return memo[key]


def tree_sha256(path: str | Path) -> str:
    """sha256 over every file under ``path`` (relative name and content digest), or of ``path`` if it is a file."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for item in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.relative_to(root).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


def model_identity(name: str) -> str:
    """The content of the model ``name`` stands for: the embedded GGUF's pinned sha256, a local directory's
    files, or a hub repository's commit."""
    from earlyexit.catalog import CATALOG
    from earlyexit.names import TINY_PREFIX, resolve_model_path

    if name in CATALOG:
        return f"gguf-sha256:{CATALOG[name].sha256}"
    path = resolve_model_path(name)
    if name.startswith(TINY_PREFIX) or Path(path).is_dir():
        return f"sha256:{tree_sha256(path)}"
    return f"hub:{name}@{hub_commit(name)}"


def hub_commit(repo_id: str) -> str:
    """The commit of ``repo_id`` in the local cache, else the one the hub serves now (the one a download gets)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str) and "/snapshots/" in cached:
        return cached.split("/snapshots/")[1].split("/")[0]
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id).sha or "unknown"


def records_sha256(pairs: list[tuple[int, dict]]) -> str:
    """sha256 of ``(id, record)`` pairs: the evaluation records exactly as the run reads them."""
    text = json.dumps([[i, record] for i, record in pairs], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
