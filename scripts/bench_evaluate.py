"""Wall time of generating the quarter exits' answers relative to one full-depth generation of the same prompts.

    python scripts/bench_evaluate.py --data PATH [--device cuda] [--limit 64] [--batch_size 16]

Both sides run the evaluation's own generation (EarlyExitModule.predict_step: batched, KV cache, stop at
EOS, each exit running blocks 1..L only); scoring is not timed. Separate truncated runs per exit are what
`evaluate` does today, so the expected ratio is about sum(L)/N = 2.5 for quarters, more where early exits
run to the length limit while the full model stops at EOS (tokens generated are printed beside the times).
"""

from __future__ import annotations

import argparse
import time

import torch

from earlyexit.data import AlpacaDataModule
from earlyexit.loading import ModelArgs
from earlyexit.module import EarlyExitModule, GenerationArgs


def run(module: EarlyExitModule, batches: list[dict], device: torch.device) -> tuple[float, dict[int, int]]:
    tokens: dict[int, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        for row in module.predict_step(batch):
            tokens[row["layer"]] = tokens.get(row["layer"], 0) + row["n_tokens"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()

    module = EarlyExitModule(base=ModelArgs(args.model, dtype=args.dtype, device=args.device),
                             generation=GenerationArgs(max_new_tokens=args.max_new_tokens), exit_layers="quarters")
    device = next(module.lm.parameters()).device
    data = AlpacaDataModule(args.data, limit=args.limit, eval_size=args.limit, batch_size=args.batch_size)
    data.attach_tokenizer(module.tokenizer)
    data.setup("predict")
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in data.predict_dataloader()]
    quarters = module.exit_layers
    n = module.ee.n_layers
    with torch.inference_mode():
        module.exit_layers = [n]
        run(module, batches[:1], device)  # warm-up
        full_s, full_tokens = run(module, batches, device)
        module.exit_layers = quarters
        all_s, all_tokens = run(module, batches, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.model} on {name} ({module.lm.dtype}), {args.limit} Alpaca prompts, batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, exits {quarters}")
    print("| run | wall (s) | tokens generated | ratio to full depth |")
    print("|---|---|---|---|")
    print(f"| full depth (layer {n}) | {full_s:.2f} | {full_tokens[n]} | 1.00 |")
    print(f"| quarter exits {quarters} (separate truncated runs) | {all_s:.2f} | "
          f"{' + '.join(str(all_tokens[l]) for l in quarters)} | {all_s / full_s:.2f} |")


if __name__ == "__main__":
    main()
