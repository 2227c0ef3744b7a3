"""The fused learned check (earlyexit/engine/check.py) against the function it replaces, decide, on Triton's
interpreter (the CPU): every buffer it writes, for learned and final decisions, with rows already out and ended.

The interpreter must be on before Triton is first imported, so the cases run in a process of their own."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = list(itertools.product([(1, 576), (5, 40), (19, 1000)], [False, True], ["all", "bare", "pending"]))


def _buffers(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(rows, 1, width, generator=g).to(torch.bfloat16),
        "delta": (0.3 * torch.randn(rows, 1, width, generator=g)).to(torch.bfloat16),
        "exited": torch.rand(rows, generator=g) < 0.3,
        "state": torch.randn(rows, 1, width, generator=g).to(torch.bfloat16),
        "layer": torch.randint(0, 9, (rows,), generator=g),
        "adapted": torch.randn(rows, 1, width, generator=g).to(torch.bfloat16),
        "out": torch.zeros(rows, 1, width, dtype=torch.bfloat16),
        "stash": torch.zeros(rows, 1, width, dtype=torch.bfloat16),
        "ended": torch.rand(rows, generator=g) < 0.2,
        "flags": torch.zeros(2, dtype=torch.bool),
        "pending": torch.zeros(rows, 1, width, dtype=torch.bfloat16),
        "weight": torch.randn(width, generator=g) / width**0.5,
        "offset": torch.tensor(0.1),
    }


def _cases() -> None:
    """Every case, fused against decide; prints one line a case (run under TRITON_INTERPRET=1)."""
    from earlyexit.engine.check import fused_decide
    from earlyexit.engine.dynamic import decide

    def refuse(*args, **kwargs):
        raise AssertionError("the fused check fell back")

    fused, at, limit = fused_decide(refuse), torch.tensor(15), torch.tensor(0.5)
    for (rows, width), final, parts in CASES:
        results = []
        for run in (decide, fused):
            b = _buffers(rows, width, seed=rows + width)
            names = {"all": ["delta", "out", "adapted", "stash", "ended", "flags"], "bare": [],
                     "pending": ["delta", "out", "stash", "ended", "flags", "pending"]}[parts]
            extra = {name: b[name] for name in names}
            run(b["hidden"], b["exited"], b["state"], b["layer"], at, limit, "learned", final, weight=b["weight"],
                offset=b["offset"], **extra)
            results.append(b)
        want, got = results
        differ = [name for name in ("exited", "layer", "state", "adapted", "out", "stash", "flags", "pending")
                  if not torch.equal(got[name], want[name])]
        exits = int(want["exited"].sum()) - int(_buffers(rows, width, rows + width)["exited"].sum())
        print(f"case {rows} {width} {final} {parts}: differ {differ} exits {exits}")
    calls = []
    fused = fused_decide(lambda *a, **k: calls.append(k))
    b = _buffers(2, 40, seed=0)
    fused(b["hidden"], b["exited"], b["state"], b["layer"], at, limit, "softmax", logits=torch.randn(2, 11))
    fused(b["hidden"], b["exited"], b["state"], b["layer"], at, limit, "learned", weight=b["weight"], offset=b["offset"],
          read=b["adapted"])
    print(f"fell back {len(calls)}")


def test_the_fused_check_writes_what_decide_writes():
    pytest.importorskip("triton", reason="the fused check is a Triton kernel (CUDA builds of torch bring Triton; the "
                                         "CPU build does not)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.startswith("case ")]) == len(CASES), done.stdout
    for line in lines:
        if line.startswith("case "):
            assert "differ []" in line, line
    # the cases are not vacuous: rows exit in some learned cases (and all running rows in the final ones)
    assert any("False" in line and "exits 0" not in line for line in lines if line.startswith("case ")), done.stdout
    assert "fell back 2" in lines, done.stdout


@pytest.mark.parametrize("dtype,final", [("bf16", False), ("bf16", True), ("fp32", False), ("fp16", False)])
def test_the_kernel_compiles_for_a_hopper_gpu_without_one(dtype, final):
    """Triton compiles the kernel to PTX for sm_90 (H100, H200) on any machine: a kernel that only the interpreter ran
    would first fail on a GPU."""
    pytest.importorskip("triton", reason="the fused check is a Triton kernel")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from earlyexit.engine.kernels import learned_check

    pointers = {name: "*" + dtype for name in ("h", "delta", "out", "state", "adapted", "stash", "pending")}
    pointers.update(exited="*i1", layer="*i64", ended="*i1", flags="*i1", weight="*fp32", offset="*fp32", at="*i64",
                    limit="*fp32")
    constants = dict(rows=8, width=576, HAS_DELTA=True, HAS_PENDING=not final, HAS_OUT=not final, HAS_ADAPTED=final,
                     HAS_STASH=not final, HAS_FLAGS=not final, FINAL=final, BLOCK_R=8, BLOCK_D=1024)
    source = ASTSource(fn=learned_check, signature={**pointers, **{name: "constexpr" for name in constants}},
                       constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".entry learned_check" in kernel.asm["ptx"]


if __name__ == "__main__":
    _cases()
