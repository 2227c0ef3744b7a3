"""Figures from arrays: each function takes numbers and returns a matplotlib Figure (Agg, never shown)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LABELS = {"bleu": "BLEU (0-100)", "rougeL": "ROUGE-L F1", "bertscore": "BERTScore F1"}


def metrics_by_layer(layers: list[int], series: dict[str, list[float]], intervals: dict[str, list[tuple]] | None = None,
                     title: str = "") -> Figure:
    """One panel per metric: the score at each exit layer with its confidence band.

    Args:
        layers: exit layers, ascending.
        series: metric name → one value per layer; several runs can be overlaid as ``"name (run)"`` keys.
        intervals: metric name → ``(low, high)`` per layer.
    """
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        base = name.split(" ")[0]
        ax.plot(layers, series[name], marker="o")
        if intervals and name in intervals:
            low, high = zip(*intervals[name])
            ax.fill_between(layers, low, high, alpha=0.25)
        ax.set_xlabel("exit layer")
        ax.set_ylabel(LABELS.get(base, base))
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def compare_by_layer(layers: list[int], runs: dict[str, dict[str, list[float]]]) -> Figure:
    """Each metric against layer, one line per run (e.g. base vs fine-tuned)."""
    names = list(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run, series in runs.items():
            ax.plot(layers, series[name], marker="o", label=run)
        ax.set_xlabel("exit layer")
        ax.set_ylabel(LABELS.get(name, name))
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
