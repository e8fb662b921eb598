"""Plots for ``lmselect report``: each function takes plain numbers (already read from the run directory) and writes
one PNG, returning its path. Matplotlib is used through ``Figure`` + the Agg canvas directly, so importing this
module never changes the global pyplot backend and works without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lmselect.artifacts import atomic_path
from lmselect.select.base import method_color as declared

DPI = 90
_CYCLE = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#aec7e8"]


def method_color(method: str) -> str:
    """Stable colour per method (same in every figure): the method's declared colour, else one from a cycle."""
    if method == "warmup":
        return "#000000"

    return declared(method) or _CYCLE[sum(map(ord, method)) % len(_CYCLE)]


def _figure(n_panels: int, width: float = 5.0, height: float = 3.4, ncols: int | None = None) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = int(np.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg


    FigureCanvasAgg(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


def smooth(y: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what is available)."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or len(y) < 3:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def score_histograms(method: str, panels: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One panel per round: score histogram of each seed (step line), the selected part filled, threshold dashed.

    ``panels``: ``[{"round": r, "seeds": [{"seed", "edges", "counts", "selected_counts" (or None),
    "threshold" (or None)}, ...]}, ...]``.
    """
    fig, axes = _figure(len(panels), width=4.2, height=3.0, ncols=min(len(panels), 4))
    for ax, panel in zip(axes, panels):
        for i, s in enumerate(panel["seeds"]):
            edges = np.asarray(s["edges"], dtype=float)
            counts = np.asarray(s["counts"], dtype=float)
            alpha = 1.0 if i == 0 else 0.5
            ax.stairs(counts, edges, color=method_color(method), alpha=alpha, label=f"seed {s['seed']}")
            if s.get("selected_counts") is not None and i == 0:
                ax.stairs(np.asarray(s["selected_counts"], float), edges, fill=True, color=method_color(method),
                          alpha=0.35, label="selected")
            if s.get("threshold") is not None:
                ax.axvline(float(s["threshold"]), color="k", ls="--", lw=1, alpha=alpha,
                           label="threshold" if i == 0 else None)
        ax.set_title(f"{method} round {panel['round']}")
        ax.set_xlabel("score")
        ax.set_ylabel("sequences")
        ax.legend(fontsize=7)
    return _save(fig, path)


def source_rates(method: str, rates: Mapping[int, Mapping[str, Sequence[float]]], fraction: float | None,
                 path: Path) -> Path:
    """Grouped bars: selection rate of each source per round (mean over seeds, error bar = std over seeds).

    ``rates``: ``{round: {source: [rate of seed 1, rate of seed 2, ...]}}``.
    """
    rounds = sorted(rates)
    sources = sorted({s for r in rounds for s in rates[r]})
    fig, (ax,) = _figure(1, width=max(5.0, 1.2 * len(rounds) * max(1, len(sources)) / 2))
    width = 0.8 / max(1, len(sources))
    x = np.arange(len(rounds))
    for j, src in enumerate(sources):
        vals = [np.asarray(rates[r].get(src, [np.nan]), float) for r in rounds]
        mean = [float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for v in vals]
        err = [float(np.nanstd(v)) if np.isfinite(v).sum() > 1 else 0.0 for v in vals]
        ax.bar(x + (j - (len(sources) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=src,
               color=_CYCLE[j % len(_CYCLE)] if j >= 3 else ["#1f77b4", "#ff7f0e", "#2ca02c"][j])
    if fraction is not None:
        ax.axhline(float(fraction), color="k", ls="--", lw=1, label=f"overall fraction {fraction:g}")
    ax.set_xticks(x, [f"round {r}" for r in rounds])
    ax.set_ylabel("selection rate")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{method}: selection rate per source")
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(series: Sequence[Mapping[str, Any]], path: Path, *, title: str, xlabel: str, ylabel: str,
           vlines: Sequence[float] = (), smooth_window: int = 0) -> Path:
    """Line plot; ``series``: ``[{"label", "method", "x", "y", "alpha"?}]`` (colour by method)."""
    fig, (ax,) = _figure(1, width=6.5, height=4.0)
    seen: set[str] = set()
    for s in series:
        y = smooth(s["y"], smooth_window) if smooth_window else np.asarray(s["y"], float)
        label = s["label"] if s["label"] not in seen else None
        seen.add(s["label"])
        ax.plot(s["x"], y, color=method_color(s["method"]), alpha=s.get("alpha", 1.0), lw=1.2, label=label)
    for v in vlines:
        ax.axvline(v, color="#bbbbbb", lw=0.8, ls=":")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)


def eval_vs_tokens(points: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[tuple[str, str]],
                   path: Path) -> Path:
    """One panel per metric, one line per method, error bars = standard error.

    ``points``: ``{method: [{"tokens": t, "<metric>": value or None, "<metric>_se": se or None}, ...]}``;
    ``metrics``: ``[(key, panel title), ...]``.
    """
    fig, axes = _figure(len(metrics), width=4.6, height=3.4)
    for ax, (key, title) in zip(axes, metrics):
        for method, pts in points.items():
            pts = [p for p in pts if p.get(key) is not None]
            if not pts:
                continue
            x = [p["tokens"] for p in pts]
            y = [p[key] for p in pts]
            se = [p.get(key + "_se") or 0.0 for p in pts]
            ax.errorbar(x, y, yerr=se, marker="o", ms=4, capsize=3, color=method_color(method), label=method)
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=7)
    return _save(fig, path)


def bilevel(method: str, series: Sequence[Mapping[str, Any]], keys: Sequence[tuple[str, str]],
            boundaries: Sequence[float], path: Path) -> Path:
    """Bilevel diagnostics, one panel per key, one line per seed over the concatenated outer steps of all rounds.

    ``series``: ``[{"seed": k, "x": [...], "<key>": [...]}, ...]``; ``boundaries``: x of round starts.
    """
    fig, axes = _figure(len(keys), width=4.2, height=3.0, ncols=min(len(keys), 4))
    for ax, (key, title) in zip(axes, keys):
        for i, s in enumerate(series):
            y = np.asarray([np.nan if v is None else v for v in s[key]], dtype=float)
            ax.plot(s["x"], y, color=_CYCLE[i % len(_CYCLE)] if i else method_color(method), lw=1.1,
                    label=f"seed {s['seed']}")
        for b in boundaries:
            ax.axvline(b, color="#bbbbbb", lw=0.8, ls=":")
        if key == "hypergrad_norm":
            ys = [v for s in series for v in s[key] if isinstance(v, (int, float)) and v > 0]
            if ys and max(ys) / min(ys) > 100:
                ax.set_yscale("log")
        ax.set_title(f"{method}: {title}")
        ax.set_xlabel("outer step (rounds concatenated)")
        ax.legend(fontsize=7)
    return _save(fig, path)
