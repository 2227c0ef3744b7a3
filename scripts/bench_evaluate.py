"""Wall time of generating the quarter exits' answers relative to one full-depth generation of the same prompts.

    python scripts/bench_evaluate.py [--data alpaca-sample] [--model.device cuda] [--limit 64] [--batch_size 16]

Every run is the evaluation's own generation (EarlyExitModule.predict_step: batched, stop at EOS, each exit
running blocks 1..L only); scoring is not timed. Two paths: the engine (the default: all exits of a batch in
one batched pass) and the reference path (``generation.engine false``: the model's own ``generate`` once per
exit, about sum(L)/N = 2.5 full generations for quarters). Each path's full-depth run is its own baseline.
"""

from __future__ import annotations

import time

import torch

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule
from earlyexit.errors import positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs
from earlyexit.module import EarlyExitModule


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


def main(model: ModelArgs = ModelArgs(), data: str = SAMPLE, limit: int = 64, batch_size: int = 16,
         max_new_tokens: int = 64, out_dir: str | None = None) -> None:
    """Wall time of generating the quarter exits' answers relative to one full-depth generation of the same prompts.

    Args:
        model: the model.
        data: Alpaca records: ``alpaca-sample``, a local file or a hub id (the first ``limit`` are used).
        limit: prompts.
        batch_size: prompts per batch.
        max_new_tokens: length limit of each answer.
        out_dir: keep the resolved config here.
    """
    for option, value in (("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        positive(option, value)
    module = EarlyExitModule(base=model, generation=GenerationArgs(max_new_tokens=max_new_tokens), exit_layers="quarters")
    device = next(module.lm.parameters()).device
    records = AlpacaDataModule(data, limit=limit, eval_size=limit, batch_size=batch_size)
    records.attach_tokenizer(module.tokenizer)
    records.setup("predict")
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in records.predict_dataloader()]
    quarters = module.exit_layers
    n = module.ee.n_layers
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{model.name} on {name} ({module.lm.dtype}), {limit} Alpaca prompts, batch {batch_size}, "
          f"max {max_new_tokens} new tokens, exits {quarters}")
    print("| path | run | wall (s) | tokens generated | ratio to the path's full depth |")
    print("|---|---|---|---|---|")
    answers = {}
    for engine in (True, False):
        module.generation = GenerationArgs(max_new_tokens=max_new_tokens, engine=engine)
        label = "engine (one batched pass)" if engine else "reference (generate per exit)"
        with torch.inference_mode():
            module.exit_layers = [n]
            run(module, batches, device)  # warm-up on every batch shape (the engine captures a graph per shape)
            full_s, full_tokens = run(module, batches, device)
            module.exit_layers = quarters
            run(module, batches, device)
            all_s, all_tokens = run(module, batches, device)
        print(f"| {label} | full depth (layer {n}) | {full_s:.2f} | {full_tokens[n]} | 1.00 |")
        print(f"| {label} | quarter exits {quarters} | {all_s:.2f} | "
              f"{' + '.join(str(all_tokens[l]) for l in quarters)} | {all_s / full_s:.2f} |", flush=True)
        answers[engine] = all_tokens
    print(f"\ntokens generated per exit, engine vs reference: {answers[True]} vs {answers[False]}")


if __name__ == "__main__":
    run_function(main, "python scripts/bench_evaluate.py")
