"""Selection summaries (``summary.json``) and their plots: score histograms and per-source selection rates.

The summary is computed from the candidates and the selected ids only, so every method (scored or random) is
described the same way; fields that need scores (threshold, histograms) are ``None`` when there are none.
Plots use matplotlib's object API with the Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError, atomic_path

HIST_BINS = 50


def histogram(values: np.ndarray, edges: np.ndarray | int = HIST_BINS) -> dict[str, list[float] | list[int]]:
    """``{"edges": [...], "counts": [...]}`` of the finite values (``edges`` an int = that many equal bins)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if isinstance(edges, (int, np.integer)) and len(v) == 0:
        return {"edges": [], "counts": []}
    counts, e = np.histogram(v, bins=edges)
    return {"edges": [float(x) for x in e], "counts": [int(c) for c in counts]}


def source_rates(pool: Any, cand_ids: np.ndarray, selected: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Per source label (``pool.sources``): number of candidates, number selected and rate = selected / candidates."""
    cand_src = np.asarray(pool.sources(np.asarray(cand_ids, dtype=np.int64)), dtype=object)
    sel_src = np.asarray(pool.sources(np.asarray(selected, dtype=np.int64)), dtype=object)
    out: dict[str, dict[str, float | int]] = {}
    for name in sorted(set(cand_src.tolist())):
        c = int(np.sum(cand_src == name))
        s = int(np.sum(sel_src == name))
        out[str(name)] = {"candidates": c, "selected": s, "rate": s / c if c else 0.0}
    return out


def _threshold(scores: np.ndarray, pos: np.ndarray, method: str, largest: bool) -> float | None:
    """Boundary score of a sharp cut, else None.

    For ``method == "top"`` it is the lowest selected score (highest with ``largest=False``). Other methods (the
    pipeline's "bliss" keeps a deterministic top fraction too) get one only when the selection really is a sharp cut
    in the ``largest`` direction: every selected score >= every rejected one (<= for lowest).
    """
    if len(pos) == 0:
        return None
    sel = scores[pos]
    rest = np.delete(scores, pos)
    if method == "top":
        return float(sel.min() if largest else sel.max())
    if method in ("random", "gumbel") or not np.all(np.isfinite(scores)):
        return None
    if largest and (len(rest) == 0 or sel.min() >= rest.max()):
        return float(sel.min())
    if not largest and (len(rest) == 0 or sel.max() <= rest.min()):
        return float(sel.max())
    return None


def build_summary(
    pool: Any,
    cand_ids: np.ndarray,
    scores: np.ndarray | None,
    selected: np.ndarray,
    method: str,
    fraction: float,
    *,
    largest: bool = True,
    extra: dict[str, Any] | None = None,
    bins: int = HIST_BINS,
) -> dict[str, Any]:
    """The ``summary.json`` dict. ``scores`` are aligned with ``cand_ids`` (or None for unscored methods).

    ``threshold`` is the boundary score of a deterministic top selection: the lowest selected score (the highest
    with ``largest=False``); Gumbel and random selections have no sharp boundary, so it is None for them (see
    :func:`_threshold` for other method names).
    """
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    selected = np.asarray(selected, dtype=np.int64)
    summary: dict[str, Any] = {
        "method": method,
        "fraction": float(fraction),
        "k": int(len(selected)),
        "n_candidates": int(len(cand_ids)),
        "selected_rate": len(selected) / len(cand_ids) if len(cand_ids) else 0.0,
        "largest": bool(largest),
        "threshold": None,
        "histogram": None,
        "scores": None,
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != cand_ids.shape:
            raise LmselectError(f"summary: {len(scores)} scores for {len(cand_ids)} candidates")
        order = np.argsort(cand_ids, kind="stable")
        pos = order[np.searchsorted(cand_ids[order], selected)]  # candidate row of each selected id
        sel_scores = scores[pos]
        summary["threshold"] = _threshold(scores, pos, method, largest)
        all_h = histogram(scores, bins)
        edges = np.asarray(all_h["edges"]) if all_h["edges"] else bins
        summary["histogram"] = {"bins": bins, "edges": all_h["edges"], "all": all_h["counts"],
                                "selected": histogram(sel_scores, edges)["counts"]}
        fin, sfin = scores[np.isfinite(scores)], sel_scores[np.isfinite(sel_scores)]
        summary["scores"] = {
            "candidates_mean": float(fin.mean()) if len(fin) else None,
            "candidates_std": float(fin.std()) if len(fin) else None,
            "selected_mean": float(sfin.mean()) if len(sfin) else None,
            "selected_min": float(sfin.min()) if len(sfin) else None,
            "selected_max": float(sfin.max()) if len(sfin) else None,
        }
    summary["per_source"] = source_rates(pool, cand_ids, selected)
    summary.update(extra or {})
    return summary


def _new_figure(w: float = 6.4, h: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    return path


def plot_score_hist(summary: dict[str, Any], path: str | Path, title: str | None = None) -> Path | None:
    """Histogram of all candidate scores with the selected ones overlaid and the threshold as a vertical line.

    Returns None (and writes nothing) when the summary has no histogram (an unscored selection).
    """
    h = summary.get("histogram")
    if not h or not h.get("edges"):
        return None
    edges = np.asarray(h["edges"], dtype=np.float64)
    widths = np.diff(edges)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], h["all"], width=widths, align="edge", color="#b0b0b0", label=f"candidates ({summary['n_candidates']})")
    ax.bar(edges[:-1], h["selected"], width=widths, align="edge", color="#1f77b4", alpha=0.85,
           label=f"selected ({summary['k']})")
    if summary.get("threshold") is not None:
        ax.axvline(summary["threshold"], color="#d62728", linestyle="--", linewidth=1.5,
                   label=f"threshold {summary['threshold']:.4g}")
    ax.set_xlabel("score")
    ax.set_ylabel("sequences")
    ax.set_title(title or f"{summary['method']} selection, fraction {summary['fraction']:g}")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_source_rates(summary: dict[str, Any], path: str | Path, title: str | None = None) -> Path | None:
    """Bar chart of the selection rate per source, with the overall rate as a horizontal line."""
    per = summary.get("per_source") or {}
    if not per:
        return None
    names = list(per)
    rates = [per[n]["rate"] for n in names]
    fig = _new_figure(max(4.0, 0.6 * len(names) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(names)), rates, color="#1f77b4")
    for b, n in zip(bars, names):
        ax.annotate(f"{per[n]['selected']}/{per[n]['candidates']}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.axhline(summary.get("selected_rate", 0.0), color="#d62728", linestyle="--", linewidth=1, label="overall")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("selected / candidates")
    ax.set_ylim(0, max(1e-9, max(rates + [summary.get("selected_rate", 0.0)])) * 1.2)
    ax.set_title(title or "selection rate per source")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
