"""Dynamic (CALM) exits: answer quality against the average depth used, next to the fixed exits.

    python scripts/sweep_dynamic.py [--adapter checkpoints/smollm2_lora_b/adapter] [--records 40]
                                    [--thresholds 0,0.3,0.5,0.7,0.9,1.01] [--measure softmax] [--plot docs/img/dynamic_sweep.png]

Greedy answers to Alpaca records 0.. (the evaluation split, never trained on) from our engine: one dynamic run
per threshold (each token exits at the first layer ≥ ``--min_layer`` whose confidence reaches the threshold) and
one all-exits pass over the fixed exits. Prints a markdown table of ROUGE-L (rouge-score, stemmed F-measure,
mean over examples) and mean layers per generated token, and plots ROUGE-L against depth.
"""

from __future__ import annotations

import argparse
import time

import torch

from earlyexit.data import encode_prompt, pad, read_records
from earlyexit.engine import Engine
from earlyexit.loading import ModelArgs, load_model
from earlyexit.metrics import build_metric
from earlyexit.model import EarlyExitHead, parse_exit_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default="checkpoints/smollm2_lora_b/adapter")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="alpaca-sample")
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--thresholds", default="0,0.3,0.5,0.7,0.9,1.01")
    parser.add_argument("--measure", default="softmax", choices=["softmax", "margin", "state"])
    parser.add_argument("--min_layer", type=int, default=8)
    parser.add_argument("--fixed", default="8,12,15,18,22,26,30", help="fixed exits to draw beside the curve")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArgs(name=args.model, adapter=args.adapter or None, device=args.device))
    if args.adapter:
        model = model.merge_and_unload()
    ee = EarlyExitHead(model)
    engine = Engine(ee)
    device = next(model.parameters()).device
    records = read_records(args.data)[: args.records]
    references = [record["output"] for record in records]
    batches = []
    for start in range(0, len(records), args.batch):
        encoded = [encode_prompt(record, tokenizer) for record in records[start : start + args.batch]]
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
    fixed = parse_exit_layers(args.fixed, ee.n_layers)
    texts = {layer: [] for layer in fixed}
    with torch.inference_mode():
        start = time.perf_counter()
        for ids, mask in batches:
            for layer, out in engine.generate(ids, mask, fixed, args.new_tokens, pad_token_id=tokenizer.pad_token_id).items():
                texts[layer] += decode(out.tokens, out.n_tokens)
        print(f"fixed exits {fixed}: {time.perf_counter() - start:.1f} s", flush=True)
        for layer in fixed:
            rows.append(dict(kind="fixed", setting=layer, depth=float(layer), rougeL=score(texts[layer])))
        for threshold in [float(t) for t in args.thresholds.split(",")]:
            start = time.perf_counter()
            answers, used = [], []
            for ids, mask in batches:
                out = engine.generate_dynamic(ids, mask, threshold, args.min_layer, args.measure, args.new_tokens,
                                              pad_token_id=tokenizer.pad_token_id)
                answers += decode(out.tokens, out.n_tokens)
                used += [layer for row, n in zip(out.layers, out.n_tokens) for layer in row[:n].tolist()]
            depth = sum(used) / max(1, len(used))
            rows.append(dict(kind=f"dynamic {args.measure}", setting=threshold, depth=depth, rougeL=score(answers)))
            print(f"threshold {threshold}: mean layers {depth:.2f}, {time.perf_counter() - start:.1f} s", flush=True)

    name = args.model + (f" + {args.adapter.rstrip('/').split('/')[-2]}" if args.adapter and "/" in args.adapter.rstrip("/") else "")
    print(f"\n{name}, {len(records)} records, greedy, at most {args.new_tokens} new tokens, min layer {args.min_layer}\n")
    print("| exit | setting | mean layers per token | ROUGE-L |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['setting']} | {row['depth']:.2f} | {row['rougeL']:.3f} |")
    if args.plot:
        plot(rows, args.plot, f"{name}: quality vs depth", args.measure)
        print(f"\nplot: {args.plot}")


def plot(rows: list[dict], path: str, title: str, measure: str) -> None:
    """ROUGE-L against mean layers per token: the dynamic thresholds as a curve, the fixed exits beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed_rows = [r for r in rows if r["kind"] == "fixed"]
    dynamic_rows = sorted((r for r in rows if r["kind"] != "fixed"), key=lambda r: r["depth"])
    ax.plot([r["depth"] for r in fixed_rows], [r["rougeL"] for r in fixed_rows], "s--", label="fixed exit at L")
    ax.plot([r["depth"] for r in dynamic_rows], [r["rougeL"] for r in dynamic_rows], "o-", label=f"dynamic ({measure} threshold)")
    for r in dynamic_rows:
        ax.annotate(f"{r['setting']:g}", (r["depth"], r["rougeL"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("mean layers per generated token")
    ax.set_ylabel("ROUGE-L")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
