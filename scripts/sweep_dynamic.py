"""Dynamic (CALM) exits: answer quality against the average depth used, next to the fixed exits.

    python scripts/sweep_dynamic.py [--model.adapter checkpoints/smollm2_lora_b/adapter] [--records 40]
                                    [--thresholds '[0,0.3,0.5,0.7,0.9,1.01]'] [--generation.measure softmax]
                                    [--plot docs/img/dynamic_sweep.png]

Greedy answers to Alpaca records 0.. (the evaluation split, never trained on) from our engine: one dynamic run
per threshold (each token exits at the first layer ≥ ``--generation.min_layer``, default N/4, whose confidence
reaches the threshold) and one all-exits pass over the fixed exits. Prints a markdown table of ROUGE-L
(rouge-score, stemmed F-measure, mean over examples) and mean layers per generated token, and plots ROUGE-L
against depth.
"""

from __future__ import annotations

import time

import torch

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, encode_prompt, pad, read_records
from earlyexit.engine import Engine
from earlyexit.errors import positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, load_model
from earlyexit.metrics import build_metric
from earlyexit.model import EarlyExitHead, ExitLayers, parse_exit_layers


def sweep(
    model: ModelArgs = ModelArgs(adapter="checkpoints/smollm2_lora_b/adapter"),
    generation: GenerationArgs = GenerationArgs(max_new_tokens=48),
    data: str = SAMPLE,
    records: int = 40,
    batch: int = 20,
    thresholds: list[float] = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01],  # noqa: B006 (read only)
    fixed: ExitLayers = "8,12,15,18,22,26,30",
    plot: str | None = None,
    out_dir: str | None = None,
) -> None:
    """Dynamic (CALM) exits: answer quality against the average depth used, next to the fixed exits.

    Args:
        model: the model (an adapter is merged before decoding).
        generation: decoding options; ``measure``, ``min_layer`` and ``max_new_tokens`` are read (greedy).
        data: Alpaca records: ``alpaca-sample``, a local file or a hub id; records 0.. are used.
        records: how many records.
        batch: prompts per batch.
        thresholds: dynamic thresholds to sweep.
        fixed: fixed exits drawn beside the curve.
        plot: write the figure here.
        out_dir: keep the resolved config here.
    """
    for option, value in (("records", records), ("batch", batch)):
        positive(option, value)
    args = model
    lm, tokenizer = load_model(args)
    if args.adapter:
        lm = lm.merge_and_unload()
    ee = EarlyExitHead(lm)
    engine = Engine(ee, compile=generation.compile, fast=generation.fast, compile_mode=generation.compile_mode)
    greedy = generation.but(do_sample=False)
    device = next(lm.parameters()).device
    chosen = read_records(data)[:records]
    references = [record["output"] for record in chosen]
    batches = []
    for start in range(0, len(chosen), batch):
        encoded = [encode_prompt(record, tokenizer) for record in chosen[start : start + batch]]
        batches.append((pad(encoded, tokenizer.pad_token_id, "left").to(device),
                        pad([[1] * len(e) for e in encoded], 0, "left").to(device)))
    rouge = build_metric("rougeL")

    def score(texts: list[str]) -> float:
        rouge.reset()
        rouge.update(texts, references)
        return rouge.aggregate(rouge.values())

    def decode(tokens, n_tokens):
        return [tokenizer.decode(t[:n].tolist(), skip_special_tokens=True).strip() for t, n in zip(tokens, n_tokens)]

    rows = []
    fixed = parse_exit_layers(fixed, ee.n_layers)
    texts = {layer: [] for layer in fixed}
    with torch.inference_mode():
        start = time.perf_counter()
        for ids, mask in batches:
            for layer, out in engine.generate(ids, mask, fixed, greedy, pad_token_id=tokenizer.pad_token_id).items():
                texts[layer] += decode(out.tokens, out.n_tokens)
        print(f"fixed exits {fixed}: {time.perf_counter() - start:.1f} s", flush=True)
        for layer in fixed:
            rows.append(dict(kind="fixed", setting=layer, depth=float(layer), rougeL=score(texts[layer])))
        for threshold in thresholds:
            start = time.perf_counter()
            answers, used = [], []
            for ids, mask in batches:
                out = engine.generate_dynamic(ids, mask, greedy, threshold=threshold, pad_token_id=tokenizer.pad_token_id)
                answers += decode(out.tokens, out.n_tokens)
                used += [layer for row, n in zip(out.layers, out.n_tokens) for layer in row[:n].tolist()]
            depth = sum(used) / max(1, len(used))
            rows.append(dict(kind=f"dynamic {greedy.measure}", setting=threshold, depth=depth, rougeL=score(answers)))
            print(f"threshold {threshold}: mean layers {depth:.2f}, {time.perf_counter() - start:.1f} s", flush=True)

    name = args.name + (f" + {args.adapter.rstrip('/').split('/')[-2]}" if args.adapter and "/" in args.adapter.rstrip("/") else "")
    print(f"\n{name}, {len(chosen)} records, greedy, at most {greedy.max_new_tokens} new tokens, "
          f"min layer {greedy.min_layer_of(ee.n_layers)}\n")
    print("| exit | setting | mean layers per token | ROUGE-L |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['setting']} | {row['depth']:.2f} | {row['rougeL']:.3f} |")
    if plot:
        from earlyexit.plotting import quality_vs_depth

        fixed_rows = [r for r in rows if r["kind"] == "fixed"]
        dynamic_rows = sorted((r for r in rows if r["kind"] != "fixed"), key=lambda r: r["depth"])
        fig = quality_vs_depth([r["depth"] for r in fixed_rows], [r["rougeL"] for r in fixed_rows],
                               {f"dynamic ({greedy.measure} threshold)": ([r["depth"] for r in dynamic_rows],
                                                                         [r["rougeL"] for r in dynamic_rows],
                                                                         [r["setting"] for r in dynamic_rows])},
                               title=f"{name}: quality vs depth")
        fig.savefig(plot, dpi=120)
        print(f"\nplot: {plot}")


if __name__ == "__main__":
    run_function(sweep, "python scripts/sweep_dynamic.py")
