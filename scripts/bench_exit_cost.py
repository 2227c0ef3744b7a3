"""Cost of an early exit relative to full depth: truncated forward (prefill) and decoding at each quarter.

    python scripts/bench_exit_cost.py [--device cpu] [--batch 4] [--prompt_len 128] [--new_tokens 32]

Prints a markdown table of median wall times and their ratio to layer N, next to the ideal L/N.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead, quarter_layers


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, _ = load_model(ModelArgs(name=args.model, device=args.device, dtype=args.dtype))
    ee = EarlyExitHead(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    n = ee.n_layers
    rows = []
    with torch.inference_mode():
        for layer in quarter_layers(n):
            prefill = timed(lambda: ee(ids, mask, exit_layer=layer), args.repeats, device)
            decode = timed(lambda: ee.generate(ids, mask, layer, max_new_tokens=args.new_tokens, ignore_eos=True),
                           args.repeats, device)
            rows.append((layer, prefill, decode))
    full_prefill, full_decode = rows[-1][1], rows[-1][2]
    print(f"model {args.model}, {n} layers, device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), dtype {model.dtype}, batch {args.batch}, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("| exit layer | ideal L/N | forward (s) | forward / full | decode (s) | decode / full |")
    print("|---|---|---|---|---|---|")
    for layer, prefill, decode in rows:
        print(f"| {layer} | {layer / n:.2f} | {prefill:.4f} | {prefill / full_prefill:.2f} | {decode:.3f} | {decode / full_decode:.2f} |")


if __name__ == "__main__":
    main()
