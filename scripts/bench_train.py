"""Early-exit training throughput, peak memory and model-FLOPs utilisation: padded against packed batches.

    python scripts/bench_train.py --device cpu --dtype float32 --batch 4 --steps 2 --warmup 1
    python scripts/bench_train.py --device cuda --dtype float32 --batch 16 --distill 0.7 --paths '[padded, packed]'
    python scripts/bench_train.py --model random-shape-llama2-7b --data null --device cuda --batch 8 --seq 512 --checkpointing true

Runs the real training step, :meth:`EarlyExitModule._loss` (LoRA on every linear layer, the early-exit loss over
every 2nd exit plus the last under the rotational curriculum, chunked and checkpointed, and with ``--distill`` the
base model's final layer as teacher, one more forward with the adapters off), with AdamW, after warm-up steps.
Every path trains on the same examples per step in one process, one after the other:

* ``padded``: each batch padded to its longest example (the collation of ``data.pack false``);
* ``packed``: the same examples packed into rows of up to ``--seq`` tokens (``data.pack true``);
* ``cached``: packed, with the teacher read from a top-64 teacher cache (``data.teacher_cache``, built before timing)
  instead of a teacher forward pass per step (with ``--distill`` > 0);
* ``fused``: packed, with the fused exit loss (``loss.fused true``: each exit's loss and gradient in one pass over
  the head, no head product recomputed in the backward pass).
* ``fast``: the new step whole, whatever ``--checkpointing`` and ``--compile`` say for the other paths: packed, the
  fused loss, compiled blocks (``model.compile_blocks``), no activation checkpointing. ``--paths '[padded, fast]'
  --checkpointing true`` puts today's step and the new one side by side in one run.

``--data`` takes Alpaca records (the shipped sample by default; the evaluation split is skipped); ``--data null``
uses random tokens of exactly ``--seq`` per row, where the two paths coincide (no padding): the setting of the
7B-shape figure, ``random-shape-llama2-7b`` being random bf16 weights (honest for speed, meaningless for quality).

Model FLOPs, for MFU, are counted on real tokens only (padding is waste, not work): per token 4·N for the frozen base
(forward, and gradients with respect to activations; frozen weights get no weight gradients), N the non-embedding
parameters, plus attention 6·layers·d·L (L: the example's length; forward + backward of activations, ×1.5 for the
causal half counted twice as usual), plus 6·d·V per active exit per answer token (the heads), plus the teacher's
forward 2·N + 2·layers·d·L per token and 2·d·V per answer token when ``--distill`` > 0 (not on the ``cached`` path,
which runs no teacher). Recomputation under
checkpointing is not counted, as usual for MFU. Peak dense bf16 of an H100 or H200: 989 TFLOP/s.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Literal

import torch

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule
from earlyexit.errors import EarlyExitError, in_unit, non_negative, positive
from earlyexit.loading import ModelArgs
from earlyexit.module import EarlyExitModule, ExitLossArgs, LoraArgs
from earlyexit.tokens import IGNORE_INDEX, supervised_tokens

PEAK_BF16 = 989e12
Path = Literal["padded", "packed", "cached", "fused", "fast"]


def batches(module: EarlyExitModule, data: str | None, batch: int, seq: int, count: int, path: Path) -> list[dict]:
    """``count`` training batches of ``batch`` examples each: Alpaca records collated as ``path``, or random tokens."""
    vocab = module.lm.config.vocab_size
    if data is None:
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(count):
            ids = torch.randint(100, vocab, (batch, seq), generator=gen)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        return out
    if module.tokenizer is None:
        raise EarlyExitError(f"{module.hparams['base']['name']} has no tokenizer: pass --data null (random tokens)")
    dm = AlpacaDataModule(data, max_length=seq, batch_size=batch, pack=path != "padded")
    dm.attach_tokenizer(module.tokenizer)
    dm.setup("fit")
    if len(dm.train_set) < batch * count:
        raise EarlyExitError(f"{len(dm.train_set)} training examples in {data!r}, fewer than {count} batches of {batch}")
    examples = [dict(e) for e in dm.train_set[: batch * count]]
    if path == "cached":  # the teacher cache of these examples, built before timing (scripts/teacher_cache.py's work)
        from earlyexit import teacher

        with module.lm.disable_adapter():
            ids, logp, _ = teacher.build(module.ee, examples, 64, 16, module.tokenizer.pad_token_id)
        start = 0
        for example in examples:
            m = supervised_tokens(example)
            example["teacher"] = (ids[start : start + m], logp[start : start + m])
            start += m
    return [dm.collate_train(examples[k * batch : (k + 1) * batch]) for k in range(count)]


def model_flops(module: EarlyExitModule, batch: dict, active: int, distill: bool) -> float:
    """FLOPs of one training step on ``batch`` as the module docstring counts them."""
    cfg = module.lm.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    n = sum(p.numel() for name, p in module.lm.named_parameters()
            if "embed" not in name and "lm_head" not in name and "lora_" not in name and "exit_adapters" not in name)
    lengths = example_lengths(batch)
    tokens = sum(lengths)
    attention = sum(6 * layers * d * length * length for length in lengths)  # Σ over tokens of 6·layers·d·L
    answers = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    flops = 4 * n * tokens + attention + 6 * d * vocab * active * answers
    if distill:
        flops += 2 * n * tokens + attention / 3 + 2 * d * vocab * answers
    return flops


def main(model: str = "smollm2-135m-instruct", device: str = "cuda", dtype: Literal["float32", "bfloat16"] = "bfloat16",
         data: str | None = SAMPLE, batch: int = 16, seq: int = 512, steps: int = 10, warmup: int = 2, rank: int = 16,
         exits: str = "every2", rotation: int = 2, distill: float = 0.0, paths: list[Path] = ["padded", "packed"],
         checkpointing: bool = False, compile: bool = False) -> None:
    """Early-exit training throughput, peak memory and MFU of the padded and packed paths.

    Args:
        model: a model name, or ``random-shape-llama2-7b`` (random weights of Llama-2-7B's shape; needs ``--data null``).
        device: ``cuda`` or ``cpu``.
        dtype: weights dtype (float32 weights train under bf16 autocast on a GPU).
        data: Alpaca records (``alpaca-sample``, a file or a hub id), or null for random tokens of ``seq`` per row.
        batch: examples per step.
        seq: the packed row length and the truncation length of an example (random tokens: the row length).
        steps: timed steps per path.
        warmup: steps before timing, per path.
        rank: LoRA rank (alpha = 2 × rank).
        exits: trained exits (quarters, all, everyK or a list); the last layer is always one.
        rotation: rotational curriculum: every k-th exit per step.
        distill: the loss's share of KL to the base model's final layer (a second forward with the adapters off).
        paths: padded, packed, cached (packed with a teacher cache), fused (packed with the fused loss), fast (fused,
            compiled blocks, no checkpointing), side by side on the same examples.
        checkpointing: activation checkpointing of the blocks (all paths but fast).
        compile: each decoder block through ``torch.compile`` (``model.compile_blocks``; compiled in the warm-up steps;
            all paths but fast, which always compiles).
    """
    for option, value in (("batch", batch), ("seq", seq), ("steps", steps), ("rank", rank), ("rotation", rotation)):
        positive(option, value)
    non_negative("warmup", warmup)
    in_unit("distill", distill)
    if not paths:
        raise EarlyExitError("paths: name at least one of padded, packed, cached, fused, fast")
    module = EarlyExitModule(
        base=ModelArgs(name=model, device=device, dtype=dtype), lora=LoraArgs(r=rank, alpha=2 * rank),
        loss=ExitLossArgs(exit_layers=exits, weights="uniform", curriculum="rotational", rotation=rotation, distill=distill),
        gradient_checkpointing=checkpointing, compile_blocks=compile,
    )
    module.train()
    cuda = device.startswith("cuda")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and dtype == "float32" else torch.autocast("cpu", enabled=False)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    n = module.ee.n_layers
    print(f"{model} on {name}: weights {dtype}, LoRA r={rank} on all linear layers ({sum(p.numel() for p in params) / 1e6:.1f}M "
          f"trainable), exits {exits}+{n} rotating by {rotation}, distill {distill}, {batch} examples a step "
          f"({'random tokens, ' + str(seq) + ' a row' if data is None else data + ', rows of up to ' + str(seq)}), "
          f"gradient checkpointing {'on' if checkpointing else 'off'}, blocks {'compiled' if compile else 'eager'}{' (fast: off, compiled)' if 'fast' in paths else ''}, "
          f"{warmup} warm-up + {steps} timed steps per path")
    print("| path | rows × width (mean) | examples/s | real tokens/s | computed tokens/s | s/step | peak memory | TFLOP/s | MFU (989) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        fast = path == "fast"
        module.loss_args = replace(module.loss_args, fused=path in ("fused", "fast"))
        module.ee.compile_blocks(compile or fast)
        if checkpointing and not fast:
            module.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.lm.gradient_checkpointing_disable()
        todo = batches(module, data, batch, seq, warmup + steps, path)
        todo = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in todo]

        def step(k: int) -> float:
            with autocast:
                out, _ = module._loss(todo[k], k, train=True)
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return model_flops(module, todo[k], len(out.per_exit), distill > 0 and path != "cached")

        for k in range(warmup):
            step(k)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        flops = sum(step(warmup + k) for k in range(steps))
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        timed = todo[warmup:]
        real = sum(sum(example_lengths(b)) for b in timed)
        computed = sum(b["input_ids"].numel() for b in timed)
        shape = f"{sum(b['input_ids'].shape[0] for b in timed) / steps:.1f} × {sum(b['input_ids'].shape[1] for b in timed) / steps:.0f}"
        if cuda:
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        else:
            import resource

            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"
        mfu = f"{flops / elapsed / PEAK_BF16:.1%}" if cuda else "n/a"
        print(f"| {path} | {shape} | {batch * steps / elapsed:,.1f} | {real / elapsed:,.0f} | {computed / elapsed:,.0f} | "
              f"{elapsed / steps:.3f} | {peak} | {flops / elapsed / 1e12:.1f} | {mfu} |")


def example_lengths(batch: dict) -> list[int]:
    """Tokens of each example of a batch: the mask's row sums, or in a packed batch the runs of restarting positions
    (a row's last example ends at its last answer token, the padding after it excluded)."""
    if batch.get("position_ids") is None:
        return [int(n) for n in batch["attention_mask"].sum(1).tolist()]
    out = []
    for row, labels in zip(batch["position_ids"].tolist(), batch["labels"].tolist()):
        last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
        for p in row[: last + 1]:
            if p == 0:
                out.append(0)
            out[-1] += 1
    return out


if __name__ == "__main__":
    run_function(main, "python scripts/bench_train.py")
