"""Decoding speed of every exit mode against Hugging Face ``generate``, side by side in one run.

    python -m earlyexit.bench [--model smollm2-135m-instruct] [--adapter DIR] [--random_config llama2-7b]
                              [--device cuda] [--batch 1] [--new_tokens 128] [--modes full,hf,...]

Every mode decodes the same prompts to the same fixed length (EOS is banned, as ``min_new_tokens`` does for
HF), greedy, after a warm-up run; the median of ``--repeats`` timed runs is reported as tokens per second
(batch × new tokens / seconds) and as a ratio to our own full-depth decode. Modes:

- ``hf``: ``model.generate`` (dynamic cache, eager); ``hf_static``: ``cache_implementation="static"``, which
  compiles the forward with ``torch.compile`` on a GPU; ``hf_assistant``: ``assistant_early_exit=E`` (HF's
  LayerSkip, batch 1 only), each with the model's own layers.
- ``full``: our engine at full depth; ``exit``: our engine at each quarter exit; ``all_exits``: all quarter
  exits in one batched pass; ``dynamic``: CALM softmax exit at ``--threshold``; ``speculative``: self-speculative
  decoding from ``--draft_layer`` with ``--n_draft`` drafts (greedy text compared with ``full``).

``--random_config llama2-7b`` builds a randomly initialised model of Llama-2-7B's shape: honest for speed,
meaningless for quality and for acceptance rates. An adapter is merged into the weights before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from earlyexit.engine import Engine
from earlyexit.errors import EarlyExitError, report_errors
from earlyexit.model import EarlyExitHead, quarter_layers

RANDOM_CONFIGS = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
MODES = ("hf", "hf_static", "hf_assistant", "full", "exit", "all_exits", "dynamic", "speculative")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m earlyexit.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF id, directory or the embedded default")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory, merged before timing")
    parser.add_argument("--random_config", choices=sorted(RANDOM_CONFIGS), help="random weights of this shape instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--data", default="alpaca-sample", help="Alpaca JSON the prompts come from")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt length with --random_config")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--threshold", type=float, default=0.9, help="dynamic exit softmax threshold")
    parser.add_argument("--min_layer", type=int, default=None, help="dynamic exit minimum layer (default N/4)")
    parser.add_argument("--draft_layer", default=None, help="speculative draft exits E, comma-separated (default N/2)")
    parser.add_argument("--n_draft", default="4", help="speculative draft lengths d, comma-separated")
    parser.add_argument("--compile", action="store_true", help="our engine's decode step through torch.compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser


def load(args) -> tuple[torch.nn.Module, object | None]:
    from earlyexit.loading import ModelArgs, load_model, resolve_device, resolve_dtype

    if args.random_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        spec = dict(RANDOM_CONFIGS[args.random_config])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
        return model.eval(), None
    model, tokenizer = load_model(ModelArgs(name=args.model, adapter=args.adapter, device=args.device, dtype=args.dtype))
    if args.adapter:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def prompts(args, model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``--batch`` left-padded prompts: Alpaca records 0.. (the evaluation split), or random ids of a fixed length."""
    device = next(model.parameters()).device
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(100, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen)
        return ids.to(device), torch.ones_like(ids).to(device)
    from earlyexit.data import encode_prompt, pad, read_records

    records = read_records(args.data)[: args.batch]
    encoded = [encode_prompt(record, tokenizer) for record in records]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = pad(encoded, pad_id, "left")
    mask = pad([[1] * len(e) for e in encoded], 0, "left")
    return ids.to(device), mask.to(device)


def timed(fn, repeats: int, device: torch.device):
    """Median seconds of ``repeats`` runs after one warm-up, and the last run's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args) -> list[dict]:
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise EarlyExitError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    model, tokenizer = load(args)
    ee = EarlyExitHead(model)
    engine = Engine(ee, compile=args.compile)
    device = next(model.parameters()).device
    ids, mask = prompts(args, model, tokenizer)
    n, new, batch = ee.n_layers, args.new_tokens, ids.shape[0]
    eos = model.generation_config.eos_token_id
    draft_layers = [int(x) for x in args.draft_layer.split(",")] if args.draft_layer else [max(1, n // 2)]
    n_drafts = [int(x) for x in str(args.n_draft).split(",")]
    min_layer = args.min_layer or max(1, n // 4)
    rows: list[dict] = []
    texts: dict[str, torch.Tensor] = {}

    def hf(**extra):
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=eos,
                                  pad_token_id=model.generation_config.pad_token_id, **extra)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]

    def add(mode, seconds, tokens=None, **extra):
        rows.append(dict(mode=mode, seconds=seconds, tokens_per_s=batch * new / seconds, **extra))
        if tokens is not None:
            texts[mode] = tokens.cpu()
        print(f"{mode:>24}: {batch * new / seconds:9.1f} tokens/s  {seconds:.3f} s", flush=True)

    with torch.inference_mode():
        if "full" in modes or "speculative" in modes or "hf_assistant" in modes:
            seconds, out = timed(lambda: engine.generate(ids, mask, [n], new, ignore_eos=True)[n], args.repeats, device)
            add("full", seconds, out.tokens)
        if "hf" in modes:
            seconds, out = timed(hf(), args.repeats, device)
            add("hf", seconds, out)
        if "hf_static" in modes:
            seconds, out = timed(hf(cache_implementation="static"), args.repeats, device)
            add("hf_static", seconds, out)
        if "exit" in modes:
            for layer in quarter_layers(n)[:-1]:
                seconds, out = timed(lambda: engine.generate(ids, mask, [layer], new, ignore_eos=True)[layer],
                                     args.repeats, device)
                add(f"exit {layer}", seconds, layer=layer, ideal=layer / n)
        if "all_exits" in modes:
            exits = quarter_layers(n)
            seconds, out = timed(lambda: engine.generate(ids, mask, exits, new, ignore_eos=True), args.repeats, device)
            add(f"all_exits {','.join(map(str, exits))}", seconds, exits=exits)
        if "dynamic" in modes:
            seconds, out = timed(lambda: engine.generate_dynamic(ids, mask, args.threshold, min_layer, "softmax", new,
                                                                 ignore_eos=True), args.repeats, device)
            add(f"dynamic {args.threshold}", seconds, mean_layers=float(out.layers.float().mean()))
        for draft_layer in draft_layers:
            for n_draft in n_drafts:
                if "speculative" in modes:
                    seconds, out = timed(lambda: engine.generate_speculative(ids, mask, draft_layer, n_draft, new,
                                                                             ignore_eos=True), args.repeats, device)
                    add(f"speculative E={draft_layer} d={n_draft}", seconds, acceptance=out.acceptance,
                        **agreement(out.tokens.cpu(), texts["full"]))
                if "hf_assistant" in modes and batch == 1:
                    seconds, out = timed(hf(assistant_early_exit=draft_layer, num_assistant_tokens=n_draft,
                                            num_assistant_tokens_schedule="constant"), args.repeats, device)
                    add(f"hf_assistant E={draft_layer} d={n_draft}", seconds, **agreement(out.cpu(), texts["full"]))
        if "hf_assistant" in modes and batch != 1:
            print(f"{'hf_assistant':>24}: skipped (HF's assistant_early_exit decodes batch 1 only)")
    full = next((row["seconds"] for row in rows if row["mode"] == "full"), None)
    for row in rows:
        row["vs_full"] = full / row["seconds"] if full else None
        if "ideal" in row and full:
            row["cost_vs_full"] = row["seconds"] / full
    for reference in ("hf", "hf_static"):
        if reference in texts and "full" in texts:
            rows.append(dict(mode="check", reference=reference, **agreement(texts["full"], texts[reference])))
    return rows


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two greedy decodes of the same prompts agree: share of identical rows, mean common prefix."""
    same = a == b
    prefix = torch.where(same.all(1), a.shape[1], (~same).int().argmax(1))
    return dict(identical=float(same.all(1).float().mean()), common_prefix=float(prefix.float().mean()))


def describe(args, model_name: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor() or "CPU"
    compiled = " · engine compiled" if args.compile else ""
    return f"{model_name} · {device} · torch {torch.__version__} · batch {args.batch} · {args.new_tokens} new tokens{compiled}"


def table(rows: list[dict]) -> str:
    lines = ["| mode | tokens/s | s | × our full depth | notes |", "|---|---:|---:|---:|---|"]
    for row in rows:
        if row["mode"] == "check":
            continue
        notes = []
        if "cost_vs_full" in row:
            notes.append(f"cost {row['cost_vs_full']:.2f} of full (L/N = {row['ideal']:.2f})")
        if "exits" in row:
            notes.append(f"cost {1 / row['vs_full']:.2f} of full")
        if "mean_layers" in row:
            notes.append(f"mean layers {row['mean_layers']:.1f}")
        if "acceptance" in row:
            notes.append(f"acceptance {row['acceptance']:.2f}")
        if "identical" in row:
            notes.append(f"greedy text identical to full in {row['identical']:.0%} of rows, "
                         f"mean common prefix {row['common_prefix']:.0f} tokens")
        vs = f"{row['vs_full']:.2f}" if row.get("vs_full") else ""
        lines.append(f"| {row['mode']} | {row['tokens_per_s']:.1f} | {row['seconds']:.3f} | {vs} | {'; '.join(notes)} |")
    for check in (row for row in rows if row["mode"] == "check"):
        lines.append(f"\nOur full-depth greedy text equals `{check['reference']}`'s in {check['identical']:.0%} of rows "
                     f"(mean common prefix {check['common_prefix']:.0f} tokens).")
    return "\n".join(lines)


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rows = run(args)
    print()
    print(describe(args, args.random_config or args.model + (f" + {Path(args.adapter).name} (merged)" if args.adapter else "")))
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
