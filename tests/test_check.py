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
    _bookkeeping()
    _engine_cases()


def _bookkeeping() -> None:
    """fused_wait against wait and fused_advance against Columns.advance and isin; prints one line each."""
    from earlyexit.engine.check import fused_advance, fused_wait
    from earlyexit.engine.core import Columns
    from earlyexit.engine.dynamic import wait

    g = torch.Generator().manual_seed(5)
    for rows, width, dim, defer in [(1, 576, 64, 16), (5, 40, 8, 4), (19, 1000, 12, 16)]:
        made = []
        for run in (wait, fused_wait):
            waiting = torch.zeros(rows, defer, width, dtype=torch.bfloat16)
            rotary = [torch.zeros(rows, defer, dim, dtype=torch.bfloat16) for _ in range(2)]
            slots, since = torch.zeros(rows, defer, dtype=torch.long), torch.zeros(defer, dtype=torch.long)
            pending = torch.zeros((), dtype=torch.bool)
            g.manual_seed(rows)
            state = torch.randn(rows, 1, width, generator=g).to(torch.bfloat16)
            cos, sin = (torch.randn(rows, 1, dim, generator=g).to(torch.bfloat16) for _ in range(2))
            slot, step, at = torch.randint(0, 99, (rows, 1), generator=g), torch.tensor([defer + 3]), torch.tensor(15)
            run(waiting, *rotary, slots, since, pending, state, cos, sin, slot, step, at, defer)
            made.append([waiting, *rotary, slots, since, pending])
        differ = [i for i, (a, b) in enumerate(zip(*made)) if not torch.equal(a, b)]
        print(f"wait {rows} {width}: differ {differ} written {int(made[0][0].abs().sum() > 0)}")
    for rows, ends in [(1, None), (6, torch.tensor([2, 7])), (33, torch.tensor([5]))]:
        made = []
        for fused in (False, True):
            loop = Columns(rows, 9, 0, "cpu", extras=1)
            loop.start(40)
            loop.step.fill_(3)
            ended = torch.zeros(rows, dtype=torch.bool)
            ended[0] = True
            g.manual_seed(rows)
            token, layer = torch.randint(0, 9, (rows,), generator=g), torch.randint(1, 30, (rows,), generator=g)
            if fused:
                fused_advance(loop.out, loop.extras[0], loop.step, loop.slot, token, layer, ended, ends)
            else:
                loop.advance(token, layer)
                if ends is not None:
                    ended.logical_or_(torch.isin(token, ends))
            made.append([loop.out, loop.extras[0], loop.step, loop.slot, ended])
        differ = [i for i, (a, b) in enumerate(zip(*made)) if not torch.equal(a, b)]
        print(f"advance {rows}: differ {differ} ended {int(made[0][4].sum())}")


def _engine_cases() -> None:
    """The skipping program with every fused kernel (forced on, on the CPU through the interpreter) against the same
    program without them: a padded batch, EOS, the learned measure through a shared exit block, thresholds that exit
    everywhere, somewhere and nowhere (skips, waiting positions and their fill, the carried add, the ended rows)."""
    import tempfile

    from earlyexit.engine import Engine
    from earlyexit.engine.dynamic import DynamicExits
    from test_adapters import prompts, shared
    from test_probe import random_probe, saved

    ee = shared("llama", seed=4, std=0.05)
    probe = saved(random_probe([1, 2, 3], ee.config.hidden_size, seed=2, std=0.1, bias=[-0.3, 0.0, 0.5]),
                  Path(tempfile.mkdtemp()))
    ids, mask = prompts()
    plain = Engine(ee).generate(ids, mask, [4], max_new_tokens=40, ignore_eos=True)[4]
    eos = int(plain.tokens[0, 20])
    common = dict(min_layer=1, measure="learned", probe=probe, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
    for rows in (3, 2):
        for threshold in (0.0, 0.5, 1.01):
            outs = []
            for fuse in (False, True):
                DynamicExits._fuses = lambda self, args, fuse=fuse: fuse
                outs.append(Engine(ee).generate_dynamic(ids[:rows], mask[:rows], threshold=threshold, **common))
            same = torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].layers, outs[1].layers)
            exits = sorted(set(outs[0].layers[outs[0].layers > 0].tolist()))
            print(f"engine {rows} {threshold}: same {same} exits {exits}")


def test_the_fused_check_writes_what_decide_writes():
    pytest.importorskip("triton", reason="the fused check is a Triton kernel (CUDA builds of torch bring Triton; the "
                                         "CPU build does not)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
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
    kept = [line for line in lines if line.startswith(("wait ", "advance "))]
    assert len(kept) == 6 and all("differ []" in line for line in kept), done.stdout
    assert all("written 1" in line for line in kept if line.startswith("wait "))
    assert any("ended 1" not in line for line in kept if line.startswith("advance ")), done.stdout  # isin matched some
    engine = [line for line in lines if line.startswith("engine ")]
    assert len(engine) == 6 and all("same True" in line for line in engine), done.stdout
    for first in (0, 3):  # exits at the first check, at several, at none
        assert "exits [1]" in engine[first] and "exits [4]" in engine[first + 2], engine
        assert len(engine[first + 1].split("[")[1].split(",")) > 1, engine


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


@pytest.mark.parametrize("name", ["wait_kernel", "advance_kernel"])
def test_the_bookkeeping_kernels_compile_for_a_hopper_gpu_without_one(name):
    """As above, for keeping a skipped position waiting and the step's last bookkeeping."""
    pytest.importorskip("triton", reason="the fused bookkeeping is Triton kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from earlyexit.engine import kernels

    if name == "wait_kernel":
        pointers = dict(waiting="*bf16", waiting_cos="*bf16", waiting_sin="*bf16", waiting_slot="*i64",
                        waiting_from="*i64", pending="*i1", state="*bf16", cos="*bf16", sin="*bf16", slot="*i64",
                        step="*i64", at="*i64")
        constants = dict(rows=32, width=576, dim=64, defer=16, BLOCK_R=8, BLOCK_D=1024, BLOCK_H=64)
    else:
        pointers = dict(out="*i64", layers="*i64", step="*i64", slot="*i64", token="*i64", layer="*i64", ended="*i1",
                        ends="*i64")
        constants = dict(rows=8, columns=129, n_ends=2, BLOCK_R=8)
    source = ASTSource(fn=getattr(kernels, name), signature={**pointers, **{k: "constexpr" for k in constants}},
                       constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert f".entry {name}" in kernel.asm["ptx"]


if __name__ == "__main__":
    _cases()
