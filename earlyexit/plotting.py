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
        series: metric name → one value per layer.
        intervals: metric name → ``(low, high)`` per layer.
    """
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(layers, series[name], marker="o")
        if intervals and name in intervals:
            low, high = zip(*intervals[name])
            ax.fill_between(layers, low, high, alpha=0.25)
        ax.set_xlabel("exit layer")
        ax.set_ylabel(LABELS.get(name, name))
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
