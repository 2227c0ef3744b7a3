"""Per-layer generation quality: decode Alpaca prompts from each exit layer and score the answers.

Each exit layer L generates with blocks 1..L only (a true early exit, never a read-out of a full run),
through Lightning's predict loop; all exits of a batch decode in one batched pass (:mod:`earlyexit.engine`;
``--generation.engine false`` runs the model's own ``generate`` per exit). ``--generation.exit dynamic
--generation.threshold 0.9`` instead gives one answer per example with CALM's per-token exits, and reports the
mean layers used. Answers are appended to ``generations.jsonl`` batch by batch, so a killed run resumes where it
stopped. BLEU, ROUGE-L and BERTScore per layer equal their reference
libraries (see :mod:`earlyexit.metrics`), with paired-bootstrap 95% intervals.

    python -m earlyexit.evaluate                                   # SmolLM2, quarters, hub Alpaca
    python -m earlyexit.evaluate --config configs/smollm2_layers.yaml
    python -m earlyexit.evaluate --compare '[results/base, results/finetuned]'
    python -m earlyexit.evaluate --config configs/smollm2_layers.yaml --rescore results/from_gpu

``--rescore DIR`` scores the answers a results directory already holds (generated elsewhere, e.g. on a GPU machine
with ``--metrics.names '[bleu]'``) without loading the model or its adapter: the evaluation records (``--data.*``)
and the model's content must be those the answers were generated from (``run.json``), else it refuses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
from jsonargparse import ArgumentParser

from earlyexit.data import AlpacaDataModule
from earlyexit.errors import EarlyExitError, non_negative, positive, report_errors
from earlyexit.loading import ModelArgs, resolve_device
from earlyexit.metrics import (
    METRICS,
    BERTScoreModel,
    CorpusBLEU,
    bootstrap_ci,
    bootstrap_counts,
    build_metric,
    check_metric_names,
    resolve_bertscore_model,
)
from earlyexit.cli import make_parser, save_config
from earlyexit.answers import (TrainerArgs, add_answer_options, check_evaluation_setup, fit_answer_prompts, generate_answers,
                               generation_fingerprint)
from earlyexit.generation import GenerationArgs
from earlyexit.module import EarlyExitModule
from earlyexit.results import ResultsDir, markdown_table



@dataclass
class MetricArgs:
    """What to score and how.

    Args:
        names: Metrics to compute: any of bleu, rougeL, bertscore.
        bertscore_model: BERTScore encoder: ``auto`` (roberta-large if cached locally, else the offline all-MiniLM-L6-v2), ``minilm``, or any HF id / path.
        bertscore_layer: Encoder layer for BERTScore; the model's usual layer when None.
        rouge_stemmer: Porter stemming in ROUGE-L (as rouge_score's use_stemmer).
        bootstrap: Bootstrap resamples for the 95% confidence intervals (0 turns intervals off).
        seed: Seed of the bootstrap resampling.
    """

    names: list[str] = field(default_factory=lambda: list(METRICS))
    bertscore_model: str = "auto"
    bertscore_layer: int | None = None
    rouge_stemmer: bool = True
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        positive("metrics.bertscore_layer", self.bertscore_layer, optional=True)
        non_negative("metrics.bootstrap", self.bootstrap)


def score(rows: list[dict], references: dict[int, str], exit_layers: list[int], n_layers: int, metrics: MetricArgs,
          bertscore: BERTScoreModel | None = None) -> dict:
    """Per-layer metrics and answer statistics of the generations ``rows`` on examples ``references``.

    Every layer is scored on the same examples (those with an answer at every layer), so layers and
    their paired bootstrap intervals are comparable.
    """
    by_layer = {layer: {} for layer in exit_layers}
    for row in rows:
        if row["layer"] in by_layer and row["id"] in references:
            by_layer[row["layer"]][row["id"]] = row
    ids = sorted(set.intersection(*(set(g) for g in by_layer.values())) if by_layer else set())
    if not ids:
        raise EarlyExitError("no example has an answer at every exit layer: nothing to score")
    refs = [references[i] for i in ids]
    counts = bootstrap_counts(len(ids), metrics.bootstrap, metrics.seed) if metrics.bootstrap else None
    final = by_layer.get(n_layers)  # agreement is with the model's own answer, so only when layer N was decoded
    scorers = {name: build_metric(name, bertscore=bertscore, use_stemmer=metrics.rouge_stemmer) for name in metrics.names}
    table = []
    for layer in exit_layers:
        gens = [by_layer[layer][i] for i in ids]
        hyps = [g["text"] for g in gens]
        entry = {"layer": layer}
        for name, metric in scorers.items():
            metric.reset()  # one metric object per name, so BERTScore loads its encoder once
            for start in range(0, len(hyps), 64):
                metric.update(hyps[start : start + 64], refs[start : start + 64])
            values = metric.values()
            entry[name] = metric.aggregate(values)
            if counts is not None:
                entry[f"{name}_ci"] = list(bootstrap_ci(values, metric.aggregate, counts))
        entry["mean_tokens"] = float(np.mean([g["n_tokens"] for g in gens]))
        entry["hit_limit"] = float(np.mean([not g["finished"] for g in gens]))
        entry["empty"] = float(np.mean([not g["text"].strip() for g in gens]))
        used = [layer for g in gens for layer in g.get("layers", ())]
        if used:
            entry["mean_layers"] = float(np.mean(used))  # dynamic exits: layers per generated token
        entry["agreement_with_final"] = (
            float(np.mean([agreement(g["tokens"], final[i]["tokens"]) for g, i in zip(gens, ids)])) if final else None
        )
        table.append(entry)
    return {"n_examples": len(ids), "example_ids": ids, "layers": table}


def agreement(tokens: list[int], final: list[int]) -> float:
    """Share of positions where two answers have the same token, over the longer answer (1 if both empty)."""
    longest = max(len(tokens), len(final))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(tokens, final)) / longest


def format_table(report: dict, names: list[str]) -> str:
    """The seed's table, ``| Layer | BLEU | ROUGE-L | BERTScore |``, with 95% intervals, then answer statistics."""
    scores = []
    for entry in report["layers"]:
        cells = [entry["layer"]]
        for name in names:
            digits = 2 if name == "bleu" else 3
            cell = f"{entry[name]:.{digits}f}"
            if f"{name}_ci" in entry:
                low, high = entry[f"{name}_ci"]
                cell += f" [{low:.{digits}f}, {high:.{digits}f}]"
            cells.append(cell)
        scores.append(cells)
    dynamic = any("mean_layers" in e for e in report["layers"])
    header = ["Layer", "mean tokens", "hit length limit", "empty", "token agreement with final layer"]
    answers = []
    for e in report["layers"]:
        agree = "n/a" if e["agreement_with_final"] is None else f"{e['agreement_with_final']:.3f}"
        answers.append([e["layer"], f"{e['mean_tokens']:.1f}", f"{e['hit_limit']:.1%}", f"{e['empty']:.1%}", agree]
                       + ([f"{e['mean_layers']:.2f}" if "mean_layers" in e else ""] if dynamic else []))
    return (markdown_table(["Layer"] + [METRICS[n] for n in names], scores) + "\n\n"
            + markdown_table(header + (["mean layers used"] if dynamic else []), answers))


def format_comparison(base: dict, tuned: dict, names: list[str], labels=("A", "B")) -> str:
    """Two runs side by side per layer, with B − A."""
    a_rows = {e["layer"]: e for e in base["layers"]}
    b_rows = {e["layer"]: e for e in tuned["layers"]}
    layers = sorted(set(a_rows) & set(b_rows))
    if not layers:
        raise EarlyExitError("the two results have no exit layer in common")
    header = ["Layer"] + [f"{METRICS[n]} {lab}" for n in names for lab in labels] + [f"Δ {METRICS[n]}" for n in names]
    digits = {n: 2 if n == "bleu" else 3 for n in names}
    rows = [[layer] + [f"{r[n]:.{digits[n]}f}" for n in names for r in (a_rows[layer], b_rows[layer])]
            + [f"{b_rows[layer][n] - a_rows[layer][n]:+.{digits[n]}f}" for n in names] for layer in layers]
    return markdown_table(header, rows)


def build_parser() -> ArgumentParser:
    parser = make_parser("python -m earlyexit.evaluate", __doc__)
    add_answer_options(parser, AlpacaDataModule)
    parser.add_class_arguments(MetricArgs, "metrics")
    parser.add_argument("--out_dir", type=str, default="results/evaluate", help="results directory (resumed if it exists)")
    parser.add_argument("--compare", type=list[str] | None, default=None,
                        help="results directories to compare with the first, per layer (no evaluation runs)")
    parser.add_argument("--compare_plot", type=str | None, default=None, help="with --compare: save an overlaid figure here")
    parser.add_argument("--rescore", type=str | None, default=None,
                        help="score the answers this results directory holds (no generation, no model loaded)")
    return parser


def run(cfg, parser: ArgumentParser) -> dict:
    model_args = ModelArgs(**cfg.model)
    generation = GenerationArgs(**cfg.generation)
    metrics = MetricArgs(**cfg.metrics)
    trainer_args = TrainerArgs(**cfg.trainer)
    check_metric_names(metrics.names)
    check_evaluation_setup(trainer_args)
    data = AlpacaDataModule(**cfg.data)
    examples = data.eval_records()  # bad data fails here, before any model is loaded
    device = resolve_device(model_args.device)
    fingerprint = generation_fingerprint(model_args, data, generation, device)
    fit_answer_prompts(model_args, data, examples, generation)  # prompts past the model's window, before it loads
    bertscore = resolve_bertscore_model(metrics.bertscore_model, metrics.bertscore_layer) if "bertscore" in metrics.names else None
    results = ResultsDir(cfg.out_dir, fingerprint)  # writable, ours alone, answers of these inputs: before the model loads
    module = EarlyExitModule(base=model_args, generation=generation, exit_layers=cfg.exit_layers)
    save_config(parser, cfg, results.path)
    if not generate_answers(module, results, data, examples, trainer_args, device):
        return {}  # a sharded run's other ranks: rank 0 scores the gathered generations
    references = {i: r["output"] for i, r in examples}
    return finish(results, references, module.exit_layers, module.ee.n_layers, metrics, bertscore,
                  model=model_args.name, adapter=model_args.adapter, data=cfg.data.source, generation=asdict(generation))


def rescore(cfg) -> dict:
    """Score the answers held by the results directory ``cfg.rescore``, checking that the evaluation records and
    the model are those its answers came from."""
    from pathlib import Path

    from transformers import AutoConfig

    from earlyexit.identity import model_identity, records_sha256
    from earlyexit.names import resolve_model_path
    from earlyexit.results import RUN

    metrics = MetricArgs(**cfg.metrics)
    check_metric_names(metrics.names)
    run_file = Path(cfg.rescore) / RUN
    if not run_file.is_file():
        raise EarlyExitError(f"--rescore {cfg.rescore!r}: no {RUN} there (not a results directory of evaluate)")
    fingerprint = json.loads(run_file.read_text())
    if fingerprint.get("purpose"):
        raise EarlyExitError(f"--rescore {cfg.rescore!r}: its answers were made by {fingerprint['purpose']}, not evaluate")
    data = AlpacaDataModule(**cfg.data)
    examples = data.eval_records()
    loaded = data.load()
    if records_sha256(list(zip(loaded.ids, loaded.records))[: data.hparams.eval_size]) != fingerprint["data_content"]:
        raise EarlyExitError(f"--rescore {cfg.rescore!r}: its answers were generated for other evaluation records than "
                             f"--data.source {data.hparams.source!r} with eval_size {data.hparams.eval_size}")
    if model_identity(fingerprint["model"]) != fingerprint["model_content"]:
        raise EarlyExitError(f"--rescore {cfg.rescore!r}: model {fingerprint['model']!r} here differs in content from the one "
                             "that generated its answers")
    n_layers = AutoConfig.from_pretrained(resolve_model_path(fingerprint["model"])).num_hidden_layers
    bertscore = resolve_bertscore_model(metrics.bertscore_model, metrics.bertscore_layer) if "bertscore" in metrics.names else None
    results = ResultsDir(cfg.rescore, fingerprint)
    layers = sorted({row["layer"] for row in results.generations()})
    if not layers:
        raise EarlyExitError(f"--rescore {cfg.rescore!r}: it holds no answers")
    references = {i: r["output"] for i, r in examples}
    return finish(results, references, layers, n_layers, metrics, bertscore, model=fingerprint["model"],
                  adapter=fingerprint["adapter"], data=fingerprint["data"], generation=fingerprint["generation"])


def finish(results: ResultsDir, references: dict[int, str], exit_layers: list[int], n_layers: int, metrics: MetricArgs,
           bertscore: BERTScoreModel | None, **about) -> dict:
    """Score the answers of ``results``, write metrics.json / .csv, table.md and the figure, print the table."""
    report = score(results.generations(), references, exit_layers, n_layers, metrics, bertscore)
    report.update({
        "model": about["model"],
        "adapter": about["adapter"],
        "n_layers": n_layers,
        "data": about["data"],
        "generation": about["generation"],
        "bleu_signature": CorpusBLEU.signature() if "bleu" in metrics.names else None,
        "rouge": {"variant": "rougeL", "use_stemmer": metrics.rouge_stemmer, "aggregate": "mean F-measure"},
        # the encoder by name, never a path of this machine (the offline copy lives inside the virtual environment)
        "bertscore": dict(model=bertscore.label or bertscore.model, num_layers=bertscore.num_layers) if bertscore else None,
        "bootstrap": {"resamples": metrics.bootstrap, "seed": metrics.seed, "level": 0.95, "paired": True},
    })
    results.write_metrics(report)
    table = format_table(report, metrics.names)
    results.write_text("table.md", table + "\n")
    write_plot(results, report, metrics.names)
    print(table)
    print(f"\nresults: {results.path}", file=sys.stderr)
    return report


def write_plot(results: ResultsDir, report: dict, names: list[str]) -> None:
    from earlyexit.plotting import metrics_by_layer

    layers = [e["layer"] for e in report["layers"]]
    series = {METRICS[n]: [e[n] for e in report["layers"]] for n in names}
    intervals = {METRICS[n]: [tuple(e[f"{n}_ci"]) for e in report["layers"]] for n in names if f"{n}_ci" in report["layers"][0]}
    fig = metrics_by_layer(layers, series, intervals, title=f"{report['model']} — {report['n_examples']} examples")
    fig.savefig(results.path / "metrics.png", dpi=120)


def compare(dirs: list[str], plot: str | None = None) -> str:
    """Tables of each run against the first (e.g. base vs fine-tuned), and optionally one overlaid figure."""
    if len(dirs) < 2:
        raise EarlyExitError(f"--compare takes at least two results directories, got {len(dirs)}")
    reports = []
    for d in dirs:
        try:
            with open(f"{d}/metrics.json") as f:
                reports.append(json.load(f))
        except FileNotFoundError:
            raise EarlyExitError(f"{d}/metrics.json not found: run the evaluation into {d} first") from None
    names = [n for n in METRICS if all(n in r["layers"][0] for r in reports)]
    parts = [f"A = {dirs[0]}"]
    for d, report in zip(dirs[1:], reports[1:]):
        parts += ["", f"B = {d}", "", format_comparison(reports[0], report, names, labels=("A", "B"))]
    if plot:
        from earlyexit.plotting import metrics_by_layer

        layers = sorted(set.intersection(*({e["layer"] for e in r["layers"]} for r in reports)))
        series = [{METRICS[n]: [next(e[n] for e in r["layers"] if e["layer"] == l) for l in layers] for n in names}
                  for r in reports]
        fig = metrics_by_layer(layers, series[0], label=dirs[0], overlay=dict(zip(dirs[1:], series[1:])))
        fig.savefig(plot, dpi=120)
    return "\n".join(parts)


@report_errors
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.compare:
        print(compare(cfg.compare, cfg.compare_plot))
        return
    if cfg.rescore:
        rescore(cfg)
        return
    run(cfg, parser)


if __name__ == "__main__":
    main()
