"""What a branch costs inside a decode step's CUDA graph: the same small kernels replayed flat, inside a taken IF
node's body, nested deeper, in the else body, and a branch not taken.

A dynamic exit's step is one CUDA graph whose checks are conditional IF nodes (earlyexit/engine/control.py). The
profile of the forced exit (docs/decoding.md) found 51.5 µs a step of gaps more than the fixed exit's, with the skip,
the shared block and the head inside an IF node's body, where the kernels themselves cost 25.8 µs more. This times
what the graph machinery costs apart from any kernel's work: ``kernels`` one-element additions, each one launch,
captured as each plan below and replayed ``repeats`` times between CUDA events.

    python scripts/bench_branches.py --kernels [8,32] --depths [1,2,3] --repeats 500
    python scripts/bench_branches.py --work mv --kernels [1,4] --depths [1] --repeats 200   # large kernels in a body

Plans: ``flat`` (the kernels in the graph itself), ``then, depth d`` (inside d nested taken IF nodes), ``else`` (the
else body of an IF node not taken, as a never-exiting check's blocks above it run), ``not taken`` (an IF node whose
body holds the kernels and does not run: the branch's own cost). ``--device cpu`` only checks the script: it walks
the plans eagerly and times the host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch

from earlyexit.cli import run_function
from earlyexit.engine.control import Branch, capture, device_decisions, walk
from earlyexit.engine.core import gpu_seconds
from earlyexit.errors import EarlyExitError, positive


def bench_branches(kernels: list[int] = [8, 32], depths: list[int] = [1, 2, 3],  # noqa: B006 (read only)
                   repeats: int = 500, work: Literal["add", "mv"] = "add",
                   mv_shape: list[int] = [49152, 576],  # noqa: B006 (read only)
                   nodes: Literal["auto", "torch", "driver"] = "auto", device: str = "cuda",
                   out: str | None = None) -> list[dict]:
    """Time each plan of kernels as a CUDA graph with conditional nodes and print the table.

    Args:
        kernels: how many one-launch kernels each plan holds.
        depths: nesting depths of taken IF nodes to time.
        repeats: replays timed per plan (after 20 untimed).
        work: each kernel's work: ``add``, a one-element addition (the node's own cost), or ``mv``, a bf16
            matrix-vector product of ``mv_shape`` (SmolLM2's head by default: a large kernel, as the skip's body holds).
        mv_shape: ``[rows, columns]`` of the ``mv`` kernels' matrix.
        nodes: how conditional nodes are built (``earlyexit.engine.control``): torch's own, the driver API's, or
            whichever this torch offers.
        device: ``cuda``; ``cpu`` only checks the script (eager, host times).
        out: a JSON file for the rows.
    """
    for option, values in (("kernels", kernels), ("depths", depths), ("repeats", [repeats])):
        for value in values:
            positive(option, value)
    if work == "mv" and (len(mv_shape) != 2 or min(mv_shape) < 1):
        raise EarlyExitError(f"mv_shape {mv_shape}: [rows, columns], both positive")
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise EarlyExitError("device cuda: no GPU here (--device cpu checks the script)")
    way = device_decisions(nodes) if on_gpu else None
    if on_gpu and way is None:
        raise EarlyExitError("no CUDA graph conditional nodes here: CUDA ≥ 12.4 and torch ≥ 2.12 or cuda-bindings")
    buffer = torch.zeros(1, device=device)
    if work == "mv":
        matrix = torch.randn(*mv_shape, device=device).to(torch.bfloat16)
        vector, product = torch.randn(mv_shape[1], device=device).to(torch.bfloat16), matrix.new_zeros(mv_shape[0])
    taken, skipped = torch.ones((), dtype=torch.bool, device=device), torch.zeros((), dtype=torch.bool, device=device)
    rows = []
    for n in kernels:
        def run(n=n):
            for _ in range(n):
                if work == "mv":
                    torch.mv(matrix, vector, out=product)
                else:
                    buffer.add_(1.0)

        plans = {"flat": [run]}
        for depth in depths:
            plan = run
            for _ in range(depth):
                plan = Branch(taken, plan)
            plans[f"then, depth {depth}"] = [plan]
        plans["else"] = [Branch(skipped, (), run)]
        plans["not taken"] = [Branch(skipped, run)]
        for name, plan in plans.items():
            seconds = _time(plan, [buffer] + ([product] if work == "mv" else []), device, way, repeats)
            rows.append(dict(plan=name, kernels=n, us=seconds * 1e6))
    flat = {row["kernels"]: row["us"] for row in rows if row["plan"] == "flat"}
    where = torch.cuda.get_device_name() if on_gpu else "cpu (eager: checks the script only)"
    kind = "one-element additions" if work == "add" else f"bf16 matrix-vector products {mv_shape[0]}x{mv_shape[1]}"
    print(f"\n{where}, torch {torch.__version__}, conditional nodes: {way or 'none'}, kernels: {kind}; µs a replay "
          f"(median of 3 stretches of {repeats})\n")
    print("| plan | kernels | µs a replay | µs more than flat | µs a kernel |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        ran = 0 if row["plan"] == "not taken" else row["kernels"]
        print(f"| {row['plan']} | {row['kernels']} | {row['us']:.1f} | {row['us'] - flat[row['kernels']]:+.1f} | "
              + (f"{row['us'] / ran:.2f} |" if ran else "|"))
    if out:
        saved = dict(card=where, torch=torch.__version__, nodes=way, work=kind, rows=rows)
        Path(out).write_text(json.dumps(saved, indent=1))
    return rows


def _time(plan, state: list[torch.Tensor], device: str, way: str | None, repeats: int) -> float:
    """Seconds one replay of ``plan`` takes: captured as one graph with conditional nodes on a GPU (the median of three
    timed stretches), walked eagerly on the CPU."""
    if way is None:
        run = lambda: walk(plan)  # noqa: E731
        clock = time.perf_counter
        run()
        times = []
        for _ in range(3):
            start = clock()
            for _ in range(repeats):
                run()
            times.append((clock() - start) / repeats)
        return sorted(times)[1]
    replay = capture(plan, state, device, way)
    for _ in range(20):
        replay()
    return sorted(gpu_seconds(replay, repeats) for _ in range(3))[1]


if __name__ == "__main__":
    run_function(bench_branches, "python scripts/bench_branches.py")
