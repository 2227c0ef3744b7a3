"""Early-exit LoRA training throughput, peak memory and model-FLOPs utilisation.

    python scripts/bench_train.py --model smollm2-135m-instruct --device cpu --batch 4 --seq 256 --steps 5
    python scripts/bench_train.py --model llama2-7b-random --device cuda --batch 8 --seq 512 --steps 10 --checkpointing true

Runs the real training step (EarlyExitModule's loss: LoRA on every linear layer, early-exit loss over
every 2nd exit plus the last, chunked and checkpointed) with AdamW on random tokens of a fixed length
(no padding), after warm-up steps. ``llama2-7b-random`` is a Llama-2-7B config with random bf16 weights:
honest for speed, meaningless for quality.

Model FLOPs per token, for MFU: the frozen base costs 2·N (forward) + 2·N (gradients with respect to
activations; frozen weights get no weight gradients) with N the non-embedding parameters, plus the
attention scores (4·layers·seq·d for forward + backward of activations, ×1.5), plus the exit heads
(6·d·V per active exit: forward, recompute under checkpointing is not counted, backward). Gradient
checkpointing's recomputation is not counted, as usual for MFU. Peak dense bf16 of an H100 SXM: 989 TFLOP/s.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from earlyexit.cli import run_function
from earlyexit.loss import active_exits, early_exit_loss, exit_weights
from earlyexit.model import EarlyExitHead, parse_exit_layers
from earlyexit.module import LoraArgs, wrap_lora

H100_BF16 = 989e12


def build(name: str, device: str, dtype: torch.dtype):
    if name == "llama2-7b-random":
        from earlyexit.tiny import random_model

        return random_model("llama2-7b", device, dtype).train()
    from earlyexit.loading import ModelArgs, load_model

    model, _ = load_model(ModelArgs(name=name, device=device, dtype="float32" if dtype == torch.float32 else "bfloat16"))
    return model


def main(model: str = "smollm2-135m-instruct", device: str = "cuda", dtype: Literal["float32", "bfloat16"] = "bfloat16",
         batch: int = 8, seq: int = 512, steps: int = 10, warmup: int = 2, rank: int = 16, exits: str = "every2",
         rotation: int = 2, checkpointing: bool = False) -> None:
    """Early-exit LoRA training throughput, peak memory and model-FLOPs utilisation.

    Args:
        model: a model name, or ``llama2-7b-random`` (random weights of Llama-2-7B's shape).
        device: ``cuda`` or ``cpu``.
        dtype: weights dtype (float32 weights train under bf16 autocast on a GPU).
        batch: sequences per step.
        seq: tokens per sequence.
        steps: timed steps.
        warmup: steps before timing.
        rank: LoRA rank (alpha = 2 × rank).
        exits: trained exits (quarters, all, everyK or a list); the last layer is always one.
        rotation: rotational curriculum: every k-th exit per step.
        checkpointing: activation checkpointing of the blocks.
    """
    from argparse import Namespace

    from earlyexit.errors import non_negative, positive

    for option, value in (("batch", batch), ("seq", seq), ("steps", steps), ("rank", rank), ("rotation", rotation)):
        positive(option, value)
    non_negative("warmup", warmup)
    args = Namespace(model=model, device=device, dtype=dtype, batch=batch, seq=seq, steps=steps, warmup=warmup, rank=rank,
                     exits=exits, rotation=rotation, checkpointing=checkpointing)
    dtype = getattr(torch, args.dtype)
    model = build(args.model, args.device, dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_lora(model, LoraArgs(r=args.rank, alpha=2 * args.rank, dropout=0.0)).to(args.device)
    model.train()
    ee = EarlyExitHead(model)
    n = ee.n_layers
    exits = sorted(set(parse_exit_layers(args.exits, n)) | {n})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == torch.float32 else torch.autocast("cpu", enabled=False)

    def step(k: int) -> int:
        active = active_exits(k, exits, n, "rotational", args.rotation)
        with autocast:
            hidden = ee.hidden_states(ids, mask, exit_layers=active)
            out = early_exit_loss(hidden, ids, ee.exit_logits, exit_weights(active, n, "uniform"))
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(active)

    for k in range(args.warmup):
        step(k)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    active_counts = [step(args.warmup + k) for k in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = args.batch * args.seq * args.steps
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    non_embedding = sum(p.numel() for name, p in model.named_parameters()
                        if "embed" not in name and "lm_head" not in name and "lora_" not in name)
    per_token = 4 * non_embedding + 1.5 * 4 * layers * args.seq * d
    per_token += 6 * d * vocab * sum(active_counts) / len(active_counts)
    achieved = per_token * tokens / elapsed
    name = torch.cuda.get_device_name() if cuda else "CPU"
    if cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (GPU, max allocated)"
    else:
        import resource

        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (process max RSS)"
    print(f"{args.model} on {name}: weights {dtype}, LoRA r={args.rank} on all linear layers "
          f"({sum(p.numel() for p in params) / 1e6:.1f}M trainable), exits {args.exits}+{n} rotating by {args.rotation} "
          f"(mean {sum(active_counts) / len(active_counts):.1f} active), batch {args.batch} × {args.seq} tokens, "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}, {args.steps} timed steps")
    print("| tokens/s | s/step | peak memory | achieved TFLOP/s | MFU (H100 bf16 989) |")
    print("|---|---|---|---|---|")
    mfu = f"{achieved / H100_BF16:.1%}" if cuda else "n/a"
    print(f"| {tokens / elapsed:,.0f} | {elapsed / args.steps:.3f} | {peak} | {achieved / 1e12:.1f} | {mfu} |")


if __name__ == "__main__":
    run_function(main, "python scripts/bench_train.py")
