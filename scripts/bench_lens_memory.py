"""Peak memory of the per-layer lens pass vs holding all N × T × V exit logits at once.

    python scripts/bench_lens_memory.py [--device cpu|cuda] [--answer_tokens 128]

Both modes teacher-force the same prompt + answer through SmolLM2 once. ``lens`` is
``earlyexit.lens.token_lens`` (one layer's logits at a time); ``all_layers`` stacks every layer's
log-probabilities into one ``[N, T, V]`` tensor first, as a naive implementation would. On CUDA the peak is
``torch.cuda.max_memory_allocated`` above what the model holds; on the CPU each mode runs in a fresh
process and the peak is the growth of its maximum resident set size over the same process after loading.
"""

from __future__ import annotations

from typing import Literal

import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from earlyexit.cli import run_function
from earlyexit.errors import positive


def measure(mode: str, device: str, answer_tokens: int) -> dict:
    from earlyexit.lens import token_lens
    from earlyexit.loading import ModelArgs, load_model
    from earlyexit.model import EarlyExitHead

    model, tok = load_model(ModelArgs(device=device, dtype="float32"))
    ee = EarlyExitHead(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Calculate the atomic mass for lithium."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    answer = torch.randint(100, model.config.vocab_size, (answer_tokens,), generator=gen).tolist()
    # warm up the allocator and kernels on a short input, then reset the peak
    token_lens(ee, tok, prompt[:8], answer[:4])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode == "lens":
        token_lens(ee, tok, prompt, answer)
    else:
        with torch.no_grad():
            ids = torch.tensor([prompt + answer], device=model.device)
            hidden = ee.hidden_states(ids)
            start = len(prompt) - 1
            stacked = torch.stack([F.log_softmax(ee.exit_logits(hidden[l][0, start : start + answer_tokens]).float(), -1)
                                   for l in range(1, ee.n_layers + 1)])  # [N, T, V]
            stacked.exp().max()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    n, v = ee.n_layers, model.config.vocab_size
    return {"mode": mode, "peak_mib": peak / 2**20, "all_logits_mib": n * answer_tokens * v * 4 / 2**20,
            "n_layers": n, "answer_tokens": answer_tokens, "vocab": v}


def main(device: str = "cpu", answer_tokens: int = 128, mode: Literal["lens", "all_layers"] | None = None) -> None:
    """Peak memory of the per-layer lens pass vs holding all N × T × V exit logits at once.

    Args:
        device: ``cpu`` or ``cuda``.
        answer_tokens: teacher-forced answer length.
        mode: measure only this mode, in this process (each mode runs in a fresh process by default).
    """
    positive("answer_tokens", answer_tokens)
    if mode:
        print(json.dumps(measure(mode, device, answer_tokens)))
        return
    rows = []
    for mode in ("lens", "all_layers"):  # fresh processes, so one mode's peak never hides the other's
        out = subprocess.run([sys.executable, __file__, "--device", device, "--answer_tokens", str(answer_tokens),
                              "--mode", mode], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (max RSS growth)"
    print(f"SmolLM2-135M-Instruct, float32, {first['n_layers']} layers × {first['answer_tokens']} answer tokens × "
          f"{first['vocab']} vocab = {first['all_logits_mib']:.0f} MiB of float32 logits; {where}")
    print("| mode | peak memory above the loaded model (MiB) |")
    print("|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['peak_mib']:.0f} |")


if __name__ == "__main__":
    run_function(main, "python scripts/bench_lens_memory.py")
