"""Where a decode step's time goes: the kernels one generated token launches, and their time, per kernel.

    python scripts/profile_decode.py [--model.device cuda] [--random_config llama2-7b] [--batch 1]
                                     [--generation.compile true] [--generation.compile_mode gemv] [--top 25]

Runs the engine's full-depth greedy decode (the bench's ``full`` mode, same prompts) once without CUDA graphs under
``torch.profiler``, so each kernel is recorded, and prints the kernels per generated token, their summed time per
token and a table of the ``--top`` kernels by time, each with its launches per token. The prompt's prefill is
included in the totals (spread over ``--tokens``). Then it times the same decode with CUDA graphs (what the bench
measures) and prints milliseconds per token: the difference from the kernel time is the gaps between kernels.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from earlyexit.bench import BenchArgs, load, prompts
from earlyexit.cli import run_function
from earlyexit.data import SAMPLE
from earlyexit.engine import Engine
from earlyexit.errors import positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs
from earlyexit.model import EarlyExitHead
from earlyexit.results import markdown_table


def kernel_times(run, device: torch.device) -> tuple[Counter, Counter]:
    """Summed time (µs) and launches of every kernel (GPU) or operator (CPU) that ``run()`` issues."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        run()
        if gpu:
            torch.cuda.synchronize()
    wanted = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    times, counts = Counter(), Counter()
    for event in prof.events():
        if event.device_type == wanted and (gpu or event.cpu_parent is None):
            times[event.name] += event.device_time_total if gpu else event.cpu_time_total
            counts[event.name] += 1
    return times, counts


def profile_decode(
    model: ModelArgs = ModelArgs(),
    generation: GenerationArgs = GenerationArgs(),
    random_config: str | None = None,
    data: str = SAMPLE,
    batch: int = 1,
    tokens: int = 32,
    top: int = 25,
) -> dict:
    """Kernels per generated token of the engine's full-depth decode, and their time.

    Args:
        model: the model (``--model.device cuda`` for kernels; on the CPU the top-level operators are counted).
        generation: ``compile``, ``compile_mode`` and ``fast`` are read (greedy, EOS banned).
        random_config: random weights of this shape instead of ``--model.name`` (as the bench).
        data: Alpaca records the prompts come from (as the bench).
        batch: prompts per step.
        tokens: new tokens per profiled decode.
        top: kernels listed.
    """
    positive("batch", batch)
    positive("tokens", tokens)
    positive("top", top)
    bench = BenchArgs(random_config=random_config, data=data, batch=batch)
    lm, tokenizer = load(model, bench)
    ee = EarlyExitHead(lm)
    ids, mask = prompts(bench, lm, tokenizer)
    device, n = ids.device, ee.n_layers
    options = dict(compile=generation.compile, compile_mode=generation.compile_mode, fast=generation.fast)

    def decode(engine, new):
        return lambda: engine.generate(ids, mask, [n], max_new_tokens=new, ignore_eos=True)

    with torch.inference_mode():
        eager = Engine(ee, cuda_graphs=False, **options)
        for _ in range(2):
            decode(eager, tokens)()  # compiles, warms up
        times, counts = kernel_times(decode(eager, tokens), device)
        per_token = sum(times.values()) / tokens
        print(f"{sum(counts.values()) / tokens:.0f} kernels per token, {per_token / 1000:.3f} ms of kernel time per token "
              f"(prefill included)")
        rows = [[f"{t / tokens:.1f}", f"{counts[name] / tokens:.1f}", name[:100]] for name, t in times.most_common(top)]
        print(markdown_table(["µs per token", "launches per token", "kernel"], rows, align="rrl"))
        result = dict(kernels_per_token=sum(counts.values()) / tokens, kernel_ms_per_token=per_token / 1000)
        if device.type == "cuda":
            graphed = Engine(ee, **options)
            for _ in range(2):
                decode(graphed, 128)()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(3):
                decode(graphed, 128)()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 3 / 128 * 1000
            print(f"with CUDA graphs: {ms:.3f} ms per token ({1000 / ms * batch:.1f} tokens/s, 128 new tokens, prefill included)")
            result["graph_ms_per_token"] = ms
    return result


if __name__ == "__main__":
    run_function(profile_decode, "python scripts/profile_decode.py")
