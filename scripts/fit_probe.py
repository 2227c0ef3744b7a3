"""Fit the exit probe of a model and adapter: CALM's learned confidence for dynamic exits (earlyexit/probe.py).

    python scripts/fit_probe.py --model.adapter checkpoints/smollm2_ee/adapter --source data/smollm2_self_answers.json \
        --eval_size 0 --layers 15,18,22 --out checkpoints/smollm2_ee/probe
    python scripts/sweep_dynamic.py --model.adapter checkpoints/smollm2_ee/adapter --generation.check_layers [15,18,22] \
        --generation.measure learned --generation.probe checkpoints/smollm2_ee/probe --offset 200 --target 0.95

Teacher-forced passes over ``examples`` training examples (the data module's training split with the training run's
``data.*`` options: never the evaluation split) collect, at every answer position and check layer, the raw block
output and whether that exit's greedy token equals the last layer's. One logistic probe per layer is fitted on all
but the last ``held_out`` share of the examples; a table of the held-out positions follows (agreement rate, the
probe's accuracy, its ROC AUC beside the softmax measure's, and the share that would exit at a few thresholds with
their agreement, for both).
"""

from __future__ import annotations

import sys

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule, Template
from earlyexit.errors import EarlyExitError, in_unit, positive
from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead, ExitLayers, parse_exit_layers
from earlyexit.tokens import IGNORE_INDEX


def main(model: ModelArgs = ModelArgs(), source: str = SAMPLE, template: Template = "auto", eval_size: int = 200,
         val_size: int = 100, max_length: int = 512, seed: int = 0, layers: ExitLayers = "15,18,22", examples: int = 400,
         held_out: float = 0.2, batch_size: int = 16, l2: float = 1e-4, out: str = "checkpoints/exit_probe",
         out_dir: str | None = None) -> None:
    """Fit and save the exit probe; print its held-out quality.

    Args:
        model: the model and adapter the probe serves (a LoRA adapter is merged, as the engine decodes it).
        source, template, eval_size, val_size, max_length, seed: the training run's ``data.*`` options.
        layers: the check layers (those of ``generation.check_layers``), below the last.
        examples: training examples read (the first of the training split).
        held_out: share of them kept out of the fit and scored.
        batch_size: examples per forward pass.
        l2: weight penalty of the logistic regression.
        out: the probe's directory.
        out_dir: keep the resolved config here.
    """
    from earlyexit import probe as P

    positive("examples", examples)
    positive("batch_size", batch_size)
    in_unit("held_out", held_out)
    data = AlpacaDataModule(source, template=template, eval_size=eval_size, val_size=val_size, max_length=max_length,
                            seed=seed)
    data.load()  # bad data fails here, before the model loads
    lm, tokenizer = load_model(model)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    ee = EarlyExitHead(lm)
    checks = parse_exit_layers(layers, ee.n_layers)
    if checks[-1] >= ee.n_layers:
        raise EarlyExitError(f"layers {checks}: a probe serves check layers below the last ({ee.n_layers}), which always exits")
    data.attach_tokenizer(tokenizer)
    data.setup("fit")
    chosen = data.train_set[:examples]
    cut = len(chosen) - round(held_out * len(chosen))
    if cut < 1 or (held_out > 0 and cut == len(chosen)):
        raise EarlyExitError(f"{len(chosen)} examples cannot be split {1 - held_out:g} / {held_out:g}: read more (--examples)")
    collected = P.collect(ee, chosen, checks, batch_size, tokenizer.pad_token_id)
    split = sum(sum(1 for y in e["labels"][1:] if y != IGNORE_INDEX) for e in chosen[:cut])  # answer positions of the fit part
    fitted = P.fit({layer: (x[:split], y[:split]) for layer, (x, y, _) in collected.items()}, l2=l2)
    print(f"exit probe: {cut} examples fitted, {len(chosen) - cut} held out; {model.name} {model.adapter or ''}")
    print("| layer | held-out positions | agree with the last layer | probe accuracy | ROC AUC: probe | ROC AUC: softmax "
          "| exit share (agreement) at 0.5 / 0.7 / 0.9: probe | softmax |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    report = {}

    def shares(score, y):
        cells = []
        for tau in (0.5, 0.7, 0.9):
            exit_ = score >= tau
            cells.append(f"{exit_.float().mean():.2f} ({y[exit_].float().mean():.2f})" if exit_.any() else "0.00 (–)")
        return " / ".join(cells)

    for layer, (x, y, top) in collected.items():
        x, y, top = x[split:], y[split:], top[split:]
        if not len(y):
            continue
        p = fitted(x, layer)
        report[layer] = {"positions": len(y), "agree": float(y.float().mean()), "accuracy": float(((p >= 0.5) == y).float().mean()),
                         "auc": P.auc(p, y), "auc_softmax": P.auc(top, y)}
        r = report[layer]
        print(f"| {layer} | {r['positions']} | {r['agree']:.3f} | {r['accuracy']:.3f} | {r['auc']:.3f} | {r['auc_softmax']:.3f} "
              f"| {shares(p, y)} | {shares(top, y)} |")
    fitted.save(out, {"model": model.name, "adapter": model.adapter, "examples": cut, "source": source,
                      "held_out": {str(k): v for k, v in report.items()}})
    print(f"exit probe at layers {fitted.layers} → {out}", file=sys.stderr)


if __name__ == "__main__":
    run_function(main, "python scripts/fit_probe.py")
