"""Figures from arrays: each function takes numbers and returns a matplotlib Figure (Agg, never shown)."""

from __future__ import annotations

import textwrap
import unicodedata

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # tokens and prompts hold "$": text, never TeX to parse

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LABELS = {
    "mean_prob": "mean p(generated token)", "mean_kl": "KL(final ‖ layer), nats", "top1_agreement": "top-1 = final top-1",
    "mean_entropy": "entropy, nats", "cross_entropy": "cross-entropy of reference, nats", "kl_to_final": "KL(final ‖ layer), nats",
    "entropy": "entropy, nats", "correct": "share judged correct",
}


def metrics_by_layer(layers: list[int], series: dict[str, list[float]], intervals: dict[str, list[tuple]] | None = None,
                     title: str = "", label: str | None = None, overlay: dict[str, dict[str, list[float]]] | None = None) -> Figure:
    """One panel per metric: the score at each exit layer with its confidence band.

    Args:
        layers: exit layers, ascending.
        series: metric name → one value per layer.
        intervals: metric name → ``(low, high)`` per layer.
        label: legend label of ``series`` (shown when there is an overlay).
        overlay: further labelled runs drawn on the same panels (e.g. ``{"tuned lens": {...}}``).
    """
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(layers, series[name], marker="o", markersize=3, label=label)
        for run, other in (overlay or {}).items():
            ax.plot(layers, other[name], marker="s", markersize=3, label=run)
        if overlay:
            ax.legend(fontsize=7)
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


def lens_heatmap(tokens: list[str], values, layers: list[int], annotations: list[list[str]] | None = None,
                 title: str = "", label: str = "probability of the generated token") -> Figure:
    """Layers (y, first at the bottom) × generated tokens (x), coloured by ``values [len(layers), T]`` in [0, 1].

    Args:
        tokens: x tick labels, one per generated token.
        values: one row per layer in ``layers``.
        annotations: optional text per cell (each layer's own top-1 token, logit-lens style).
    """
    import numpy as np

    values = np.asarray(values, dtype=float)
    width = max(6.0, 0.42 * len(tokens) + 2.0)
    height = max(3.0, 0.24 * len(layers) + 1.6)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([_show(t) for t in tokens], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers], fontsize=7)
    ax.set_xlabel("generated token")
    ax.set_ylabel("exit layer")
    if annotations is not None:
        for row, texts in enumerate(annotations):
            for col, text in enumerate(texts):
                ax.text(col, row, _show(text)[:6], ha="center", va="center", fontsize=4.5,
                        color="white" if values[row, col] < 0.5 else "black")
    fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.01)
    if title:
        ax.set_title(_printable(title), fontsize=9)
    fig.tight_layout()
    return fig


def _show(token: str) -> str:
    """A token as a readable tick label: whitespace and invisible characters made visible, never empty."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    if text.strip() == "":
        return "␣" * max(len(text), 1)
    return _printable(text)


def _printable(text: str) -> str:
    """``text`` with control, format (zero-width, byte-order mark), private and unassigned characters written as
    ``\\uXXXX``: a font has no glyph for them (the PDF backend fails on a lone U+FEFF)."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Cn") else c for c in text)


def quality_vs_depth(fixed_depth: list[float], fixed_quality: list[float],
                     curves: dict[str, tuple[list[float], list[float], list[float]]], title: str = "",
                     quality: str = "ROUGE-L", depth: str = "mean layers per generated token") -> Figure:
    """Quality against depth: the fixed exits as squares, each curve (``label: (depth, quality, settings)``, e.g. a
    dynamic-exit threshold sweep) as a line with each point labelled by its setting (points on one another share one
    label, as in :func:`quality_vs_speed`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fixed_depth, fixed_quality, "s--", label="fixed exit at L")
    points = []
    for label, (xs, ys, settings) in curves.items():
        ax.plot(xs, ys, "o-", label=label)
        group = label.split(" (")[0].removeprefix("dynamic ")  # "dynamic learned (threshold)": learned
        points += [(x, y, group, f"{setting:g}") for x, y, setting in zip(xs, ys, settings)]
    _label(ax, points, [*fixed_depth, *(p[0] for p in points)], [*fixed_quality, *(p[1] for p in points)], 8)
    return _finish(fig, ax, depth, quality, title, 10, None)


def quality_vs_speed(groups: dict[str, tuple[list[float], list[float], list[str]]], title: str = "",
                     quality: str = "ROUGE-L", speed: str = "generated tokens/s") -> Figure:
    """Quality against speed: each group (``label: (speeds, qualities, settings)``, e.g. fixed exits, a dynamic
    threshold sweep, speculative settings, HF) as its own marker, each point labelled by its setting; points that fall
    on one another (within 1.5% of each axis's span: settings that ran the same thing) share one label."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = []
    for (label, (xs, ys, settings)), marker in zip(groups.items(), "so^Dvx*P"):
        ax.plot(xs, ys, marker, linestyle="none", label=label)
        points += [(x, y, label, str(setting)) for x, y, setting in zip(xs, ys, settings)]
    _label(ax, points, [p[0] for p in points], [p[1] for p in points], 7)
    return _finish(fig, ax, speed, quality, title, 9, 8)


def _label(ax, points: list[tuple[float, float, str, str]], xs: list[float], ys: list[float], size: float) -> None:
    """Label each point ``(x, y, group, setting)`` by its setting; points that fall on one another (within 1.5% of the
    span of ``xs`` and ``ys``: settings that ran the same thing) share one label, naming each one's group where the
    groups differ."""
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    clusters: list[tuple[float, float, list[tuple[str, str]]]] = []
    for x, y, group, setting in points:
        near = (c for c in clusters if abs(c[0] - x) <= 0.015 * span_x and abs(c[1] - y) <= 0.015 * span_y)
        cluster = next(near, None)
        if cluster is None:
            clusters.append((x, y, [(group, setting)]))
        else:
            cluster[2].append((group, setting))
    for x, y, members in clusters:
        if len(members) == 1:
            ax.annotate(members[0][1], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=size)
            continue
        one_group = len({group for group, _ in members}) == 1
        names = (setting if one_group else f"{group} {setting}" for group, setting in members)
        text = textwrap.fill(", ".join(names), 40)
        side = (x - min(xs)) / span_x  # a shared label is centred under its point, or ends at it near the right edge
        ha, dx = ("right", -4) if side > 0.75 else ("left", 4) if side < 0.25 else ("center", 0)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, -12), fontsize=size - 0.5, va="top", ha=ha)


def sweep_depth(rows: list[dict], title: str = "") -> Figure:
    """:func:`quality_vs_depth` of ``scripts/sweep_dynamic.py``'s rows: the fixed exits, and a curve per dynamic measure
    by depth (the repeated full-depth row left out)."""
    rows = [row for row in rows if not row.get("again")]
    fixed = [row for row in rows if row["kind"] == "fixed"]
    curves = {}
    for kind in dict.fromkeys(row["kind"] for row in rows if row["kind"].startswith("dynamic")):
        points = sorted((row for row in rows if row["kind"] == kind), key=lambda row: row["depth"])
        curves[f"{kind} (threshold)"] = ([r["depth"] for r in points], [r["rougeL"] for r in points],
                                         [r["setting"] for r in points])
    return quality_vs_depth([r["depth"] for r in fixed], [r["rougeL"] for r in fixed], curves, title=title)


def sweep_speed(rows: list[dict], title: str = "") -> Figure:
    """:func:`quality_vs_speed` of ``scripts/sweep_dynamic.py``'s rows, a group per kind (fixed, each dynamic measure,
    speculative, HF; the repeated full-depth row left out)."""
    groups: dict[str, tuple[list[float], list[float], list[str]]] = {}
    for row in rows:
        if row.get("again"):
            continue
        xs, ys, names = groups.setdefault(row["kind"], ([], [], []))
        xs.append(row["speed"])
        ys.append(row["rougeL"])
        names.append(f"{row['setting']:g}" if isinstance(row["setting"], (int, float)) else str(row["setting"]))
    return quality_vs_speed(groups, title=title)


def quality_by_depth(models: dict[str, tuple[tuple[list[float], list[float]], tuple[list[float], list[float]]]],
                     title: str = "", quality: str = "ROUGE-L") -> Figure:
    """Several models on one panel against relative depth (exit layer / N): each model's base run dashed and its
    fine-tuned run solid, in one colour (``label: ((depths, base), (depths, tuned))``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ((base_x, base_y), (tuned_x, tuned_y)) in models.items():
        line, = ax.plot(tuned_x, tuned_y, "o-", label=f"{label}, fine-tuned")
        ax.plot(base_x, base_y, "o--", color=line.get_color(), alpha=0.7, label=f"{label}, base")
    return _finish(fig, ax, "exit layer / N", quality, title, 10, 7)


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str, title_size: int, legend_size: int | None) -> Figure:
    """A one-panel figure's axis labels, title, grid and legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig
