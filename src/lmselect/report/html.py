"""report.html: self-contained (inline CSS, figures as base64 data URIs, no external requests), plus decoded examples
of the highest- and lowest-scored sequences."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError, atomic_write_json, atomic_write_text
from lmselect.data.pool import TokenPool
from lmselect.provenance import DONE, stale_artifacts
from lmselect.report.figures import FigureEntry, make_figures
from lmselect.report.model import RoundData, RunData, collect
from lmselect.report.results import (
    headline_sections,
    per_seed_table,
    results,
    results_markdown,
    selection_rate_table,
    task_table,
)
from lmselect.score.sidecar import read_scores


@dataclass
class Example:
    seq_id: int
    score: float
    selected: bool | None
    text: str


def examples(data: RunData, n: int = 3, max_chars: int = 400, notes: list[str] | None = None,
             ) -> list[dict[str, Any]]:
    """Highest- and lowest-scored sequences of each (method, round) (first seed with scores), decoded with the
    pool's tokenizer. Returns ``[{"method", "seed", "round", "keeps": "highest"/"lowest"/None, "top": [Example],
    "bottom": [Example]}]``."""
    notes = notes if notes is not None else []
    if n <= 0:
        return []
    want = []
    for method in data.methods():
        by_round: dict[int, RoundData] = {}
        for rd in data.iter_rounds(method):
            if rd.scores_dir is not None and rd.round not in by_round:
                by_round[rd.round] = rd
        want += [by_round[r] for r in sorted(by_round)]
    if not want:
        notes.append("examples skipped: no complete scores in the run")
        return []
    if data.pool is None:
        notes.append("examples skipped: the run has no pool (RUN/pool or config.yaml pool.path)")
        return []

    try:
        pool = TokenPool(data.pool)
    except LmselectError as e:
        notes.append(f"examples skipped: pool not readable ({' '.join(str(e).split())})")
        return []
    try:  # TokenPool.decode loads the tokenizer on every call: load it once for this pool object
        tok = pool.load_tokenizer()
        pool.load_tokenizer = lambda: tok  # type: ignore[method-assign]
    except LmselectError as e:
        notes.append(f"examples skipped: the pool's tokenizer does not load ({' '.join(str(e).split())})")
        return []
    out = []
    for rd in want:
        assert rd.scores_dir is not None
        try:
            ids, sc = read_scores(rd.scores_dir)
        except (LmselectError, ValueError, OSError) as e:
            notes.append(f"examples skipped for {rd.method}/seed{rd.seed}/round{rd.round}: scores not readable "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
            continue
        sel = set(np.load(rd.selected_path).tolist()) if rd.selected_path is not None else None
        order = np.lexsort((ids, -sc))  # highest first, ties by seq_id
        top = order[:n]
        bottom = order[::-1][: min(n, max(0, len(order) - len(top)))]

        def ex(i: int, ids: np.ndarray = ids, sc: np.ndarray = sc, sel: Any = sel) -> Example:  # bound per round
            sid = int(ids[i])
            try:
                text = pool.decode(sid)
            except (LmselectError, IndexError) as e:
                text = f"<could not decode: {e}>"
            if len(text) > max_chars:
                text = text[:max_chars] + " …"
            return Example(sid, float(sc[i]), (sid in sel) if sel is not None else None, text)

        keeps = None  # which end the selection keeps: summary.largest, else where the selected scores lie
        largest = (rd.summary or {}).get("largest")
        if isinstance(largest, bool):
            keeps = "highest" if largest else "lowest"
        elif sel:
            in_sel = np.isin(ids, np.fromiter(sel, dtype=np.int64))
            if 0 < in_sel.sum() < len(ids):
                keeps = "highest" if sc[in_sel].mean() >= sc[~in_sel].mean() else "lowest"
        out.append({"method": rd.method, "seed": rd.seed, "round": rd.round, "keeps": keeps,
                    "top": [ex(i) for i in top], "bottom": [ex(i) for i in bottom]})
    return out


# ----------------------------------------------------------------------------------------------------------------
# html

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}tr.mean td{font-weight:bold;background:#fafafa}
.meta{color:#555;font-size:.9em}.s-done{color:#1a7f37}.s-partial{color:#b35900}.s-missing{color:#c62828}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;background:#f7f7f7;
padding:.4em;margin:.2em 0;border-left:3px solid #bbb}.ex.sel{border-left-color:#1a7f37}
.notes li{color:#7a5200}.stale{color:#c62828}pre.md{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: list[str], rows: list[list[str]], mean_rows: bool = False) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = []
    for r in rows:
        cls = ' class="mean"' if mean_rows and r[1].startswith("mean of") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status_html(status: dict[str, Any]) -> str:
    def s(v: str) -> str:
        return f'<span class="s-{_e(v)}">{_e(v)}</span>'

    parts = [f"<p>run: {s(status['run'])} &middot; pool: {s(status['pool'])} &middot; warm-up target: "
             f"{s(status['warmup']['target'])} &middot; warm-up proxy: {s(status['warmup']['proxy'])}</p>"]
    rows = []
    for method, seeds in status["rounds"].items():
        for seed, rounds in seeds.items():
            for r, info in rounds.items():
                stages = " ".join(f"{_e(k)}={s(v)}" for k, v in info["stages"].items())
                rows.append(f"<tr><td>{_e(method)}</td><td>{_e(seed)}</td><td>{_e(r)}</td><td>{s(info['status'])}</td>"
                            f"<td>{stages}</td></tr>")
    if rows:
        parts.append("<table><thead><tr><th>method</th><th>seed</th><th>round</th><th>status</th><th>stages</th>"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    c = status["counts"]
    parts.append(f"<p>rounds: {c['done']} done, {c['partial']} partial, {c['missing']} missing</p>")
    return "\n".join(parts)


def _data_uri(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def render_html(data: RunData, res: dict[str, Any], figs: list[FigureEntry], exs: list[dict[str, Any]],
                stale: list[str], notes: list[str]) -> str:
    """The self-contained report page."""
    m = data.manifest or {}
    name = data.run_dir.resolve().name
    meta = [f"directory: {_e(data.run_dir.resolve())}"]
    for label, key in (("run uuid", "uuid"), ("config hash", "config_hash"), ("git commit", "git_commit"),
                       ("created", "created")):
        if m.get(key):
            meta.append(f"{label}: <code>{_e(m[key])}</code>")
    if data.manifest is None:
        meta.append('<span class="s-partial">run manifest absent: run in progress or interrupted</span>')
    meta.append(f"report generated: {_e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lmselect report: {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lmselect report: {_e(name)}</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}</p>',
        "<h2>Results</h2>",
    ]
    for sec in headline_sections(res):
        parts += [f"<h3>{_e(sec['title'])}</h3>", f'<p class="meta">{_e(sec["note"])}</p>']
        if sec["rows"]:
            parts.append(_html_table(sec["header"], sec["rows"]))
        if sec["bullets"]:
            parts.append("<ul>" + "".join(f"<li>{_e(b)}</li>" for b in sec["bullets"]) + "</ul>")
    parts.append("<h3>Per seed</h3>")
    header, rows = per_seed_table(res)
    if rows:
        parts.append(_html_table(header, rows, mean_rows=True))
    else:
        parts.append("<p>No method rounds found.</p>")
    parts.append("<p class=\"meta\">Final = last round with a complete evaluation; 9-task average uses acc_norm where "
                 "a task reports it, else acc; selection time sums the selection stages over rounds.</p>")
    rate_table = selection_rate_table(res)
    if rate_table:
        parts += ["<h3>Selection rate per source (fraction of each source's candidates kept, mean over rounds and "
                  "seeds)</h3>", _html_table(*rate_table)]
    if res["tasks"]:
        th, tr = task_table(res)
        parts += ["<h3>Per-task accuracy (final round, %, mean over seeds)</h3>", _html_table(th, tr)]
    parts.append(f'<details><summary>results.md</summary><pre class="md">{_e(results_markdown(res))}</pre></details>')

    parts += ["<h2>Stage status</h2>", _status_html(data.status)]
    parts.append("<h2>Provenance</h2>")
    if stale:
        parts.append('<p class="stale">Artifacts whose parents changed since they were made (rerun them):</p><ul>')
        parts += [f'<li class="stale">{_e(s)}</li>' for s in stale]
        parts.append("</ul>")
    else:
        parts.append("<p>All recorded parents match their current manifests.</p>")

    parts.append("<h2>Figures</h2>")
    if not figs:
        parts.append("<p>No figures could be drawn from this run directory yet.</p>")
    for f in figs:
        parts.append(f'<figure id="fig-{_e(f.name)}"><img alt="{_e(f.title)}" src="{_data_uri(f.path)}">'
                     f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)} <code>figures/{_e(f.path.name)}</code>"
                     "</figcaption></figure>")

    parts.append("<h2>Examples: what the score model prefers</h2>")
    if not exs:
        parts.append("<p>No examples (no scored rounds, or the pool is not available).</p>")
    for ex in exs:
        keeps = f" · selection keeps the {ex['keeps']} scores" if ex.get("keeps") else ""
        parts.append(f"<h3>{_e(ex['method'])}, round {_e(ex['round'])} (seed {_e(ex['seed'])}){_e(keeps)}</h3>")
        for label, key in (("Highest scores", "top"), ("Lowest scores", "bottom")):
            parts.append(f"<h4>{label}</h4>")
            for e in ex[key]:
                sel = "" if e.selected is None else (" · selected" if e.selected else " · not selected")
                cls = "ex sel" if e.selected else "ex"
                parts.append(f'<div class="{cls}"><b>seq {e.seq_id} · score {e.score:.4g}{_e(sel)}</b>\n'
                             f"{_e(e.text)}</div>")
    parts.append("<h2>Notes</h2>")
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    else:
        parts.append("<p>Nothing was skipped.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, *, n_examples: int = 3, max_chars: int = 400) -> Path:
    """Write ``report.html``, ``figures/*.png``, ``results.json`` and ``results.md`` for a run directory.

    Reads only the run directory. Returns the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    data = collect(run_dir)
    notes: list[str] = list(data.notes)
    for method, seeds in data.status["rounds"].items():
        for seed, rounds in seeds.items():
            for r, info in rounds.items():
                if info["status"] != DONE:
                    notes.append(f"{method}/seed{seed}/round{r} is {info['status']}: its numbers are left out or partial")
    fig_dir = run_dir / "figures"
    figs = make_figures(data, fig_dir, notes)
    keep = {f.path.name for f in figs}
    for old in fig_dir.glob("*.png"):  # figures of pieces that no longer exist
        if old.name not in keep:
            old.unlink()
    exs = examples(data, n_examples, max_chars, notes)
    stale = [f"{n.rel}: {p.describe()}" for n, p in stale_artifacts(run_dir)]
    res = results(data)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "results.md", results_markdown(res))
    out = run_dir / "report.html"
    atomic_write_text(out, render_html(data, res, figs, exs, stale, notes))
    return out


