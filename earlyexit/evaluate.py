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
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import lightning as L
import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import BasePredictionWriter

from earlyexit.data import AlpacaDataModule
from earlyexit.distributed import check_setup
from earlyexit.errors import EarlyExitError, non_negative, positive, report_errors
from earlyexit.loading import ModelArgs, resolve_device, resolve_dtype
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
from earlyexit.model import ExitLayers
from earlyexit.module import EarlyExitModule, GenerationArgs
from earlyexit.results import ResultsDir

HEADERS = {"bleu": "BLEU", "rougeL": "ROUGE-L", "bertscore": "BERTScore"}


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


@dataclass
class TrainerArgs:
    """Where the predict loop runs (Lightning Trainer options).

    Args:
        accelerator: ``cpu``, ``gpu`` or ``auto`` (follows --model.device).
        devices: Devices (processes) per node; with more than one the examples are sharded over them.
        num_nodes: Nodes (under torchrun or SLURM).
        strategy: Lightning strategy of a sharded run (``ddp``: each rank holds a full copy of the model).
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"

    def __post_init__(self):
        positive("trainer.devices", self.devices)
        positive("trainer.num_nodes", self.num_nodes)


class GenerationWriter(BasePredictionWriter):
    """Appends each batch's generations to the results directory as soon as the batch ends."""

    def __init__(self, results: ResultsDir):
        super().__init__(write_interval="batch")
        self.results = results

    def on_predict_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()  # every rank has joined: the generation itself starts here

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.results.append(prediction, rank=trainer.global_rank if trainer.world_size > 1 else None)


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
    lines = ["| Layer | " + " | ".join(HEADERS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for entry in report["layers"]:
        cells = [str(entry["layer"])]
        for name in names:
            digits = 2 if name == "bleu" else 3
            cell = f"{entry[name]:.{digits}f}"
            if f"{name}_ci" in entry:
                low, high = entry[f"{name}_ci"]
                cell += f" [{low:.{digits}f}, {high:.{digits}f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    dynamic = any("mean_layers" in e for e in report["layers"])
    extra = " mean layers used |" if dynamic else ""
    lines += ["", "| Layer | mean tokens | hit length limit | empty | token agreement with final layer |" + extra,
              "|---|---|---|---|---|" + ("---|" if dynamic else "")]
    for e in report["layers"]:
        agree = "n/a" if e["agreement_with_final"] is None else f"{e['agreement_with_final']:.3f}"
        used = f" {e['mean_layers']:.2f} |" if "mean_layers" in e else (" |" if dynamic else "")
        lines.append(f"| {e['layer']} | {e['mean_tokens']:.1f} | {e['hit_limit']:.1%} | {e['empty']:.1%} | {agree} |" + used)
    return "\n".join(lines)


def format_comparison(base: dict, tuned: dict, names: list[str], labels=("A", "B")) -> str:
    """Two runs side by side per layer, with B − A."""
    a_rows = {e["layer"]: e for e in base["layers"]}
    b_rows = {e["layer"]: e for e in tuned["layers"]}
    layers = sorted(set(a_rows) & set(b_rows))
    if not layers:
        raise EarlyExitError("the two results have no exit layer in common")
    header = ["Layer"] + [f"{HEADERS[n]} {lab}" for n in names for lab in labels] + [f"Δ {HEADERS[n]}" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for layer in layers:
        a, b = a_rows[layer], b_rows[layer]
        digits = {n: 2 if n == "bleu" else 3 for n in names}
        cells = [str(layer)] + [f"{r[n]:.{digits[n]}f}" for n in names for r in (a, b)]
        cells += [f"{b[n] - a[n]:+.{digits[n]}f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m earlyexit.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with model:, data:, generation:, metrics: keys")
    parser.add_class_arguments(ModelArgs, "model")
    parser.add_class_arguments(AlpacaDataModule, "data")
    parser.add_class_arguments(GenerationArgs, "generation")
    parser.add_class_arguments(MetricArgs, "metrics")
    parser.add_class_arguments(TrainerArgs, "trainer")
    parser.add_argument("--exit_layers", type=ExitLayers, default="quarters",
                        help="quarters (N/4, N/2, 3N/4, N), all, everyK (every K-th from the top), or a list like 8,16,24,32")
    parser.add_argument("--out_dir", type=str, default="results/evaluate", help="results directory (resumed if it exists)")
    parser.add_argument("--compare", type=list[str] | None, default=None,
                        help="results directories to compare with the first, per layer (no evaluation runs)")
    parser.add_argument("--compare_plot", type=str | None, default=None, help="with --compare: save an overlaid figure here")
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
    bertscore = resolve_bertscore_model(metrics.bertscore_model, metrics.bertscore_layer) if "bertscore" in metrics.names else None
    module = EarlyExitModule(base=model_args, generation=generation, exit_layers=cfg.exit_layers)  # a bad model or layer fails before any write
    results = ResultsDir(cfg.out_dir, fingerprint)
    results.write_text("config.yaml", parser.dump(cfg))
    if not generate_answers(module, results, data, examples, trainer_args, device):
        return {}  # a sharded run's other ranks: rank 0 scores the gathered generations
    references = {i: r["output"] for i, r in examples}
    report = score(results.generations(), references, module.exit_layers, module.ee.n_layers, metrics, bertscore)
    report.update({
        "model": model_args.name,
        "adapter": model_args.adapter,
        "n_layers": module.ee.n_layers,
        "data": cfg.data.source,
        "generation": asdict(generation),
        "bleu_signature": CorpusBLEU.signature() if "bleu" in metrics.names else None,
        "rouge": {"variant": "rougeL", "use_stemmer": metrics.rouge_stemmer, "aggregate": "mean F-measure"},
        "bertscore": asdict(bertscore) if bertscore else None,
        "bootstrap": {"resamples": metrics.bootstrap, "seed": metrics.seed, "level": 0.95, "paired": True},
    })
    results.write_metrics(report)
    table = format_table(report, metrics.names)
    results.write_text("table.md", table + "\n")
    write_plot(results, report, metrics.names)
    print(table)
    print(f"\nresults: {results.path}", file=sys.stderr)
    return report


def check_evaluation_setup(trainer_args: TrainerArgs) -> None:
    """Devices and strategy of the predict loop: data parallel only (each rank generates with a whole model)."""
    check_setup(trainer_args.accelerator, trainer_args.devices, trainer_args.strategy, trainer_args.num_nodes)
    if trainer_args.strategy not in ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"):
        raise EarlyExitError(f"trainer.strategy {trainer_args.strategy!r}: evaluation shards the examples over ranks that "
                             "each hold the whole model; use ddp")


def generation_fingerprint(model_args: ModelArgs, data: AlpacaDataModule, generation: GenerationArgs, device,
                           **extra) -> dict:
    """What the generations of a results directory depend on (a directory never mixes two of them): the options,
    and the content of the model, the adapter and the evaluation records (an input changed in place is caught)."""
    from earlyexit.identity import model_identity, records_sha256, tree_sha256

    hp = data.hparams
    loaded = data.load()
    return {
        "model": model_args.name,
        "model_content": model_identity(model_args.name),
        "adapter": model_args.adapter,
        "adapter_content": tree_sha256(model_args.adapter) if model_args.adapter else None,
        "data_content": records_sha256(list(zip(loaded.ids, loaded.records))[: hp.eval_size]),
        "dtype": str(resolve_dtype(model_args.dtype, device)),
        "data": hp.source,
        "template": hp.template,
        "max_length": hp.max_length,
        "generation": asdict(generation),
        **extra,
    }


def generate_answers(module: EarlyExitModule, results: ResultsDir, data: AlpacaDataModule,
                     examples: list[tuple[int, dict]], trainer_args: TrainerArgs, device) -> bool:
    """Generate every (example, exit layer) answer that ``results`` does not hold yet, through the predict loop.

    ``examples`` are ``(id, record)`` pairs of Alpaca-shaped records; the prompt is rendered by ``data``.
    With several devices (``trainer_args``) the predict loop shards the examples over the ranks without
    padding (each is generated exactly once); each rank appends to its own file, and once all are done the
    first folds them into ``generations.jsonl``. Returns whether this process is the first (rank 0) one.
    """
    module.done = {}
    for row in results.generations():
        module.done.setdefault(row["id"], set()).add(row["layer"])
    todo = [(i, r) for i, r in examples if not set(module.exit_layers) <= module.done.get(i, set())]
    data.attach_tokenizer(module.tokenizer)
    data.set_predict(todo)
    if not todo:
        print(f"{len(examples)} examples × {len(module.exit_layers)} exit layers: all done in {results.path}", file=sys.stderr)
        return rank_zero_only.rank == 0  # under torchrun/SLURM every rank gets here; only the first scores
    accelerator = "gpu" if device.type == "cuda" and trainer_args.accelerator == "auto" else trainer_args.accelerator
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=trainer_args.devices, num_nodes=trainer_args.num_nodes, strategy=trainer_args.strategy,
        logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[GenerationWriter(results)],
    )
    if trainer.is_global_zero:
        print(f"{len(examples)} examples × {len(module.exit_layers)} exit layers {module.exit_layers}; "
              f"{len(examples) - len(todo)} examples already done in {results.path}; {trainer.world_size} process(es)",
              file=sys.stderr)
    writer = next(c for c in trainer.callbacks if isinstance(c, GenerationWriter))
    trainer.predict(module, dataloaders=data.predict_dataloader(), return_predictions=False)
    if trainer.world_size > 1:
        trainer.strategy.barrier()  # every rank's file is complete
    seconds = time.perf_counter() - writer.started
    if trainer.world_size > 1 and trainer.is_global_zero:
        results.merge_ranks()
    if trainer.is_global_zero:
        print(f"generated {len(todo)} examples × {len(module.exit_layers)} exit layers in {seconds:.1f} s "
              f"on {trainer.world_size} process(es)", file=sys.stderr)
    return trainer.is_global_zero


def write_plot(results: ResultsDir, report: dict, names: list[str]) -> None:
    from earlyexit.plotting import metrics_by_layer

    layers = [e["layer"] for e in report["layers"]]
    series = {n: [e[n] for e in report["layers"]] for n in names}
    intervals = {n: [tuple(e[f"{n}_ci"]) for e in report["layers"]] for n in names if f"{n}_ci" in report["layers"][0]}
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
        series = [{n: [next(e[n] for e in r["layers"] if e["layer"] == l) for l in layers] for n in names} for r in reports]
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
    run(cfg, parser)


if __name__ == "__main__":
    main()
