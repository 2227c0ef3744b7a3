"""Several GPUs: evaluation throughput scaling of the sharded predict loop, and early-exit LoRA training
throughput and peak memory under FSDP or DDP, 1 vs N devices measured in one run.

    python scripts/bench_multigpu.py eval --eval_config configs/smollm2_layers.yaml --limit 192 --devices '[1,2]'
    python scripts/bench_multigpu.py train --devices '[1,2]' --batch 8 --seq 512 --steps 10 [--strategy ddp]

``eval`` runs ``python -m earlyexit.evaluate`` (quarter exits, scoring not timed) with 1 and with N devices
(``ddp``: every rank holds the model, the predict loop shards the examples) and reports the generation
phase's wall time, as printed by ``evaluate``, and the share of identical answers.

``train`` runs the real training step (EarlyExitModule on the Lightning Trainer: LoRA r=16 on every linear
layer, exits every 2nd layer + last rotating by 2, bf16-mixed; the chunked loss and gradient checkpointing unless
``--fused true`` / ``--checkpointing false``) on
random tokens, 1 device vs N devices with ``fsdp`` (each decoder block one unit) or ``ddp`` (a whole model per GPU). The model
is a Llama-2-7B config with random bf16 weights (``llama2-7b-random``): honest for speed, meaningless for
quality. Step times are measured on rank 0 after warm-up steps; peak memory is each rank's max allocated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Literal

from earlyexit.cli import run_subcommands
from earlyexit.errors import positive

ROOT = Path(__file__).resolve().parents[1]


# --- evaluation scaling ----------------------------------------------------------------------------------


def bench_eval(eval_config: str = "configs/smollm2_layers.yaml", limit: int = 192, batch_size: int = 16,
               devices: list[int] = [1, 2], device: str = "cuda") -> None:  # noqa: B006 (read only)
    """Evaluation: generation time with 1 and N devices (``ddp``), and the share of identical answers.

    Args:
        eval_config: the ``evaluate`` config whose model and data are used.
        limit: records of the evaluation split.
        batch_size: prompts per batch.
        devices: device counts to compare (the first is the baseline).
        device: ``cuda``, or ``cpu`` (processes instead of GPUs).
    """
    for option, value in (("limit", limit), ("batch_size", batch_size), *(("devices", d) for d in devices)):
        positive(option, value)
    args = Namespace(config=eval_config, limit=limit, batch_size=batch_size, devices=devices, device=device)
    runs = {}
    for devices in args.devices:
        out = Path(tempfile.mkdtemp(prefix=f"bench_eval_{devices}_"))
        cmd = [sys.executable, "-m", "earlyexit.evaluate", "--config", args.config, "--data.limit", str(args.limit),
               "--data.batch_size", str(args.batch_size), "--exit_layers", "quarters", "--metrics.names", "[bleu]",
               "--metrics.bootstrap", "0", "--model.device", args.device, "--trainer.devices", str(devices), "--out_dir", str(out)]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp"]
        if args.device == "cpu":
            cmd += ["--trainer.accelerator", "cpu"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        seconds = float(re.search(r"exit layers in ([\d.]+) s on", proc.stderr).group(1))
        rows = {(r["id"], r["layer"]): r["tokens"] for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}
        tokens = sum(len(t) for t in rows.values())
        runs[devices] = (seconds, wall, rows, tokens)
        print(f"{devices} GPU(s): generation {seconds:.1f} s ({len(rows)} answers, {tokens} tokens, {tokens / seconds:,.0f} tokens/s); "
              f"whole command {wall:.1f} s", flush=True)
    base = runs[args.devices[0]]
    for devices, (seconds, wall, rows, tokens) in runs.items():
        same = sum(rows[k] == base[2].get(k) for k in rows) / len(rows)
        print(f"| {devices} | {seconds:.1f} | {tokens / seconds:,.0f} | {base[0] / seconds:.2f}× | {wall:.1f} | {same:.1%} |")


# --- FSDP training -----------------------------------------------------------------------------------


def train_worker(model: str = "llama2-7b-random", devices: int = 1, batch: int = 8, seq: int = 512, steps: int = 10,
                 warmup: int = 3, strategy: Literal["fsdp", "ddp"] = "fsdp", fused: bool = False,
                 checkpointing: bool = True) -> None:
    """One training run (``devices`` processes through Lightning; each rank runs this function)."""
    args = Namespace(model=model, devices=devices, batch=batch, seq=seq, steps=steps, warmup=warmup, strategy=strategy)
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from earlyexit.distributed import configure_strategy
    from earlyexit.loading import ModelArgs
    from earlyexit.names import RANDOM_PREFIX
    from earlyexit.module import EarlyExitModule, ExitLossArgs, LoraArgs, OptimArgs

    local = int(os.environ.get("LOCAL_RANK", 0))
    name = RANDOM_PREFIX + "llama2-7b" if args.model == "llama2-7b-random" else args.model  # random: built on this rank's GPU
    module = EarlyExitModule(
        base=ModelArgs(name=name, device=f"cuda:{local}", dtype="bfloat16"), lora=LoraArgs(r=16, alpha=32),
        loss=ExitLossArgs(exit_layers="every2", weights="uniform", curriculum="rotational", rotation=2, fused=fused),
        optim=OptimArgs(lr=1e-4, warmup_steps=0), gradient_checkpointing=checkpointing,
    )
    gen = torch.Generator().manual_seed(0)
    total = (args.warmup + args.steps) * args.batch * args.devices
    ids = torch.randint(100, 32000, (total, args.seq), generator=gen)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]

    class Clock(L.Callback):
        def __init__(self):
            self.times, self.peak = [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=pl_module.device)
            peaks = trainer.strategy.all_gather(peak).flatten().tolist()
            if trainer.is_global_zero:
                tokens = args.steps * args.batch * args.seq * trainer.world_size
                print("RESULT " + json.dumps({
                    "devices": trainer.world_size, "strategy": type(trainer.strategy).__name__, "seconds": elapsed,
                    "tokens_per_s": tokens / elapsed, "tokens_per_s_per_gpu": tokens / elapsed / trainer.world_size,
                    "peak_gib": peaks, "gpu": torch.cuda.get_device_name(),
                }), flush=True)

    trainer = L.Trainer(
        accelerator="gpu", devices=args.devices, strategy=args.strategy if args.devices > 1 else "auto", precision="bf16-mixed",
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[Clock()],
    )
    configure_strategy(trainer.strategy, module)
    trainer.fit(module, DataLoader(data, batch_size=args.batch, collate_fn=lambda rows: {
        k: torch.stack([r[k] for r in rows]) for k in rows[0]}))


def bench_train(model: str = "llama2-7b-random", devices: list[int] = [1, 2], batch: int = 8, seq: int = 512,  # noqa: B006
                steps: int = 10, warmup: int = 3, strategy: Literal["fsdp", "ddp"] = "fsdp", fused: bool = False,
                checkpointing: bool = True) -> None:
    """Data-parallel training: tokens/s and peak memory with 1 device and N devices (``fsdp`` or ``ddp``).

    Args:
        model: ``llama2-7b-random`` (random bf16 weights of Llama-2-7B's shape) or a model name.
        devices: device counts to compare.
        batch: sequences per GPU per step.
        seq: tokens per sequence.
        steps: timed steps.
        warmup: steps before timing.
        strategy: with several devices, ``fsdp`` (sharded) or ``ddp`` (a whole model per GPU: LoRA at 7B fits one).
        fused: the fused exit loss (``loss.fused``) instead of the chunked, checkpointed one.
        checkpointing: activation checkpointing of the blocks.
    """
    for option, value in (("batch", batch), ("seq", seq), ("steps", steps), *(("devices", d) for d in devices)):
        positive(option, value)
    args = Namespace(model=model, devices=devices, batch=batch, seq=seq, steps=steps, warmup=warmup, strategy=strategy)
    results = []
    for devices in args.devices:
        cmd = [sys.executable, __file__, "_train", "--devices", str(devices), "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--strategy", args.strategy,
               "--fused", str(fused).lower(), "--checkpointing", str(checkpointing).lower()]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{devices} device(s) failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(line, flush=True)
    print(f"{args.model}, batch {args.batch} × {args.seq} tokens per GPU, {args.steps} timed steps, "
          f"{'fused' if fused else 'chunked'} exit loss, checkpointing {'on' if checkpointing else 'off'}, on {results[0]['gpu']}")
    print("| GPUs | strategy | tokens/s | tokens/s per GPU | peak memory per GPU (GiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['devices']} | {r['strategy']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{', '.join(f'{p:.1f}' for p in r['peak_gib'])} |")


if __name__ == "__main__":
    run_subcommands({"eval": bench_eval, "train": bench_train, "_train": train_worker}, "python scripts/bench_multigpu.py", __doc__)
