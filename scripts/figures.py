"""Redraw every figure under docs/img from the results it names, so that no figure is older than its table.

    python scripts/figures.py                       # every figure of docs/figures.yaml (make figures)
    python scripts/figures.py --only '[docs/img/smollm2_layers.png]'
    python scripts/figures.py --manifest my_figures.yaml   # your own runs: the same kinds, your results directories

The manifest lists each figure: where it goes (``out``), what it draws (``kind``) and the results it reads
(``results``: directories the commands wrote). Kinds and what they read:

* ``layers``: one ``evaluate`` directory's ``metrics.json``: each metric against the exit layer, with its interval.
* ``compare``: several ``evaluate`` directories' ``metrics.json`` overlaid (``labels`` names them), as
  ``evaluate --compare`` draws them; only the layers every run scored.
* ``depth`` / ``speed``: one ``scripts/sweep_dynamic.py --out_dir`` directory's ``sweep.json``: ROUGE-L against mean
  layers per token (fixed exits and the dynamic curve), or against tokens/s (every mode).
* ``models``: pairs of ``evaluate`` directories (base, fine-tuned) of several models, ``labels`` one per model: each
  model's ROUGE-L against relative depth (exit layer / N), base dashed, fine-tuned solid.
* ``judge``: one or more ``judge`` directories' ``metrics.json``: the share judged correct per layer.
* ``lens``: one ``lens`` directory: each answer's ``lens_K.json`` (a heatmap per lens and a summary, written as
  ``out`` with ``K`` and the lens name filled in) and ``dataset_lens.json``.

The manifest shipped names ``docs/data/``: small copies of those results files (metrics, no generations), each with
a ``SOURCE.md`` saying which command made it, on what, and when. A results directory you made is read the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from earlyexit.cli import run_function
from earlyexit.errors import EarlyExitError

KINDS = ("layers", "compare", "models", "depth", "speed", "judge", "lens")
METRICS = {"bleu": "BLEU", "rougeL": "ROUGE-L", "bertscore": "BERTScore"}


def main(manifest: str = "docs/figures.yaml", only: list[str] | None = None) -> list[str]:
    """Redraw the figures of ``manifest`` from the results each names.

    Args:
        manifest: a YAML list of figures: ``out``, ``kind`` (layers, compare, depth, speed, judge, lens), ``results``
            (directories), optional ``labels`` and ``title``.
        only: redraw just these ``out`` paths.
    """
    path = Path(manifest)
    if not path.is_file():
        raise EarlyExitError(f"manifest {manifest} not found")
    entries = yaml.safe_load(path.read_text()) or []
    if only:
        unknown = sorted(set(only) - {entry.get("out") for entry in entries})
        if unknown:
            raise EarlyExitError(f"--only {unknown}: not in {manifest}")
        entries = [entry for entry in entries if entry["out"] in only]
    for entry in entries:  # every entry checked before anything is drawn
        if entry.get("kind") not in KINDS or not entry.get("out") or not entry.get("results"):
            raise EarlyExitError(f"{manifest}: each figure needs out, kind ({', '.join(KINDS)}) and results: {entry}")
        if entry["kind"] == "models" and (len(entry["results"]) % 2 or len(entry.get("labels") or []) * 2 != len(entry["results"])):
            raise EarlyExitError(f"{entry['out']}: a models figure takes results in pairs (base, fine-tuned) and one label "
                                 f"per pair: {entry}")
        for directory in entry["results"]:
            if not Path(directory).is_dir():
                raise EarlyExitError(f"{entry['out']}: results directory {directory} not found (run the command in its "
                                     f"SOURCE.md, or point the manifest at your own run)")
    written = []
    for entry in entries:
        written += DRAW[entry["kind"]](entry)
    for out in written:
        print(out)
    return written


def _read(directory: str, name: str) -> dict:
    file = Path(directory) / name
    if not file.is_file():
        raise EarlyExitError(f"{file} not found")
    report = json.loads(file.read_text())
    if report.get("complete") is False:
        raise EarlyExitError(f"{file} is a sweep cut short ({len(report['rows'])} rows): run it to the end first")
    return report


def _save(fig, out: str) -> list[str]:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return [out]


def layers(entry: dict) -> list[str]:
    from earlyexit.plotting import metrics_by_layer

    report = _read(entry["results"][0], "metrics.json")
    rows = report["layers"]
    names = [name for name in METRICS if name in rows[0]]
    series = {METRICS[n]: [row[n] for row in rows] for n in names}
    intervals = {METRICS[n]: [tuple(row[f"{n}_ci"]) for row in rows] for n in names if f"{n}_ci" in rows[0]}
    title = entry.get("title", f"{report['model']} — {report['n_examples']} examples")
    return _save(metrics_by_layer([row["layer"] for row in rows], series, intervals, title=title), entry["out"])


def compare(entry: dict) -> list[str]:
    from earlyexit.plotting import metrics_by_layer

    reports = [_read(directory, "metrics.json") for directory in entry["results"]]
    labels = entry.get("labels") or entry["results"]
    names = [n for n in METRICS if all(n in report["layers"][0] for report in reports)]
    shown = sorted(set.intersection(*({row["layer"] for row in report["layers"]} for report in reports)))
    series = [{METRICS[n]: [next(row[n] for row in report["layers"] if row["layer"] == layer) for layer in shown]
               for n in names} for report in reports]
    fig = metrics_by_layer(shown, series[0], title=entry.get("title", ""), label=labels[0],
                           overlay=dict(zip(labels[1:], series[1:])))
    return _save(fig, entry["out"])


def models(entry: dict) -> list[str]:
    from earlyexit.plotting import quality_by_depth

    def curve(directory: str) -> tuple[list[float], list[float]]:
        report = _read(directory, "metrics.json")
        n = report.get("n_layers") or max(row["layer"] for row in report["layers"])
        return [row["layer"] / n for row in report["layers"]], [row["rougeL"] for row in report["layers"]]

    pairs = zip(entry["results"][::2], entry["results"][1::2])
    shown = {label: (curve(base), curve(tuned)) for label, (base, tuned) in zip(entry["labels"], pairs)}
    return _save(quality_by_depth(shown, title=entry.get("title", "")), entry["out"])


def depth(entry: dict) -> list[str]:
    from earlyexit.plotting import sweep_depth

    return _save(sweep_depth(_read(entry["results"][0], "sweep.json")["rows"], entry.get("title", "")), entry["out"])


def speed(entry: dict) -> list[str]:
    from earlyexit.plotting import sweep_speed

    return _save(sweep_speed(_read(entry["results"][0], "sweep.json")["rows"], entry.get("title", "")), entry["out"])


def judge(entry: dict) -> list[str]:
    from earlyexit.plotting import metrics_by_layer

    reports = [_read(directory, "metrics.json") for directory in entry["results"]]
    labels = entry.get("labels") or entry["results"]
    shown = [row["layer"] for row in reports[0]["layers"]]
    series = [{"correct": [next(r["accuracy"] for r in report["layers"] if r["layer"] == layer) for layer in shown]}
              for report in reports]
    intervals = {"correct": [tuple(row["accuracy_ci"]) for row in reports[0]["layers"]]}
    fig = metrics_by_layer(shown, series[0], intervals, title=entry.get("title", ""), label=labels[0],
                           overlay=dict(zip(labels[1:], series[1:])) or None)
    return _save(fig, entry["out"])


def lens(entry: dict) -> list[str]:
    from earlyexit.lens import answer_figures, dataset_figure

    directory = Path(entry["results"][0])
    written = []
    answers = sorted(directory.glob("lens_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not answers:
        raise EarlyExitError(f"{directory}: no lens_K.json (run python -m earlyexit.lens with --out_dir {directory})")
    for file in answers:
        k = file.stem.split("_")[1]
        for name, fig in answer_figures(json.loads(file.read_text())).items():
            written += _save(fig, entry["out"].format(k=k, name=name.replace(" ", "_")))
    if (directory / "dataset_lens.json").is_file():
        stats = json.loads((directory / "dataset_lens.json").read_text())
        written += _save(dataset_figure(stats, entry.get("title", "")), str(Path(entry["out"]).parent / "dataset_lens.png"))
    return written


DRAW = {"layers": layers, "compare": compare, "models": models, "depth": depth, "speed": speed, "judge": judge, "lens": lens}


if __name__ == "__main__":
    sys.exit(0 if run_function(main, "python scripts/figures.py") is not None else 1)
