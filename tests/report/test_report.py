"""lmselect report: html + figures + results table from a synthetic run directory, read from disk alone."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmselect.artifacts import LmselectError, read_json, read_manifest
from lmselect.report import collect, concat_logs, examples, stage_seconds, write_report

EXPECTED_FIGURES = {
    "score_hist_bliss",
    "score_hist_mates",
    "source_rates_random",
    "source_rates_bliss",
    "source_rates_mates",
    "train_loss",
    "eval_vs_tokens",
    "bilevel_bliss",
    "kept_fraction",
}
METHODS = ("random", "bliss", "mates", "rho1", "blade")


def png_size(path: Path) -> tuple[int, int]:
    """Width, height of a PNG; asserts the signature and the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def data_uris(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)


def test_report_writes_html_and_every_figure(reported_run):
    html = (reported_run / "report.html").read_text()
    figs = {p.stem: p for p in (reported_run / "figures").glob("*.png")}
    assert set(figs) == EXPECTED_FIGURES
    for p in figs.values():
        w, h = png_size(p)
        assert w > 100 and h > 100
        import matplotlib.image as mpimg

        img = mpimg.imread(p)
        assert img.shape[0] == h and img.shape[1] == w
        assert float(np.std(img)) > 0.01, f"{p.name} is blank"
    # every figure is embedded, byte for byte, as a data URI; nothing else is referenced
    embedded = [base64.b64decode(u.split(",", 1)[1]) for u in data_uris(html)]
    assert len(embedded) == len(figs)
    assert sorted(embedded) == sorted(p.read_bytes() for p in figs.values())
    assert not re.search(r'(?:src|href)\s*=\s*["\'](?!data:|#)', html), "external reference in report.html"
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html
    # a results row for each method and seed, and a mean row per method
    for m in METHODS:
        for seed in (0, 1):
            assert re.search(rf"<tr><td>{m}</td><td>{seed}</td><td>2/2</td>", html), (m, seed)
        assert f'<tr class="mean"><td>{m}</td><td>mean of 2</td>' in html
    # pieces that cannot exist for some methods are skipped with a note, nothing failed
    assert "score histogram skipped for random: selection without scores" in html
    assert "score histogram skipped for rho1" in html and "selection rate per source skipped for blade" in html
    assert "skipped (" not in html  # no figure raised


def test_results_md_and_json(reported_run):
    res = read_json(reported_run / "results.json")
    md = (reported_run / "results.md").read_text()
    rows = {(r["method"], r["seed"]): r for r in res["rows"]}
    assert set(rows) == {(m, s) for m in METHODS for s in (0, 1)}
    b0 = rows[("bliss", 0)]
    final = read_json(reported_run / "bliss/seed0/round2/eval/results.json")
    assert b0["final_round"] == 2 and b0["tokens"] == final["tokens"]
    assert b0["val_loss"] == pytest.approx(final["val_loss"])
    assert b0["downstream_average"] == pytest.approx(final["downstream"]["average"])
    assert b0["downstream_stderr"] == pytest.approx(final["downstream"]["average_stderr"])
    # selection wall time = bilevel + scores + selection timings over both rounds (41+42 + 5+5 + 0.5+0.5)
    assert b0["selection_seconds"] == pytest.approx(94.0)
    assert rows[("mates", 1)]["selection_seconds"] == pytest.approx(91 + 92 + 5 + 5 + 0.5 + 0.5)
    assert rows[("rho1", 0)]["selection_seconds"] == 1.0  # its whole-shard selection stage (2 rounds x 0.5 s)
    assert b0["config_hash"] == read_manifest(reported_run / "bliss/seed0/round2")["config_hash"]
    assert res["config_hash"] == read_manifest(reported_run)["config_hash"]
    # aggregates over seeds
    agg = res["methods"]["bliss"]
    assert agg["n_seeds"] == 2
    assert agg["downstream_average"] == pytest.approx(np.mean([rows[("bliss", s)]["downstream_average"] for s in (0, 1)]))
    assert agg["downstream_stderr"] == pytest.approx(np.sqrt(2 * 0.0067**2) / 2)
    assert set(res["tasks"]["bliss"]) == set(final["downstream"]["tasks"])
    assert res["tasks"]["bliss"]["piqa"]["metric"] == "acc_norm"

    lines = md.splitlines()
    assert lines[0] == "# Results: RUN"
    summary = next(line for line in lines if line.startswith("| method |"))
    # the continuous downstream metrics lead the table, accuracy stays beside
    assert summary == ("| method | seeds | 9-task P(correct) | 9-task bits/byte (correct answer) | lambada loss (report "
                       "set) | clean loss (report set) | 9-task avg (%) |")
    assert b0["downstream_prob"] == pytest.approx(final["downstream"]["average_prob_correct"])
    assert b0["downstream_bpb_stderr"] == pytest.approx(final["downstream"]["average_bpb_stderr"])
    assert agg["downstream_prob"] == pytest.approx(np.mean([rows[("bliss", s)]["downstream_prob"] for s in (0, 1)]))
    pb = res["paired_vs_random"]["bliss"]["downstream_prob"]
    assert pb["better"] == "higher" and pb["seeds"] == [0, 1] and "mde" in pb and "ratio_to_noise" in pb
    sd = np.std([rows[("bliss", s)]["val_loss"]["lambada"] for s in (0, 1)], ddof=1)
    assert f"| {agg['val_loss']['lambada']:.4f} ± {sd:.4f} |" in md and "| bliss | 2 | " in md
    # paired by seed against random, with a 95 % t interval (2 seeds: t = 12.706)
    d = [rows[("bliss", s)]["val_loss"]["lambada"] - rows[("random", s)]["val_loss"]["lambada"] for s in (0, 1)]
    pv = res["paired_vs_random"]["bliss"]["val_loss.lambada"]
    half = 12.706 * np.std(d, ddof=1) / np.sqrt(2)
    assert pv["mean"] == pytest.approx(np.mean(d)) and pv["ci95"] == pytest.approx([np.mean(d) - half, np.mean(d) + half])
    assert pv["within_noise"] == (pv["ci95"][0] <= 0 <= pv["ci95"][1])
    assert "## Paired difference to random" in md
    header = next(line for line in lines if line.startswith("| method | seed | rounds |"))
    assert header == ("| method | seed | rounds | tokens | val loss (lambada) | val loss (clean) | 9-task avg ± se (%) "
                      "| selection time | config hash |")
    row = next(line for line in lines if line.startswith("| bliss | 0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    lam, clean = final["val_loss"]["lambada"], final["val_loss"]["clean"]
    avg = 100 * final["downstream"]["average"]
    assert cells == ["bliss", "0", "2/2", f"{final['tokens'] / 1e3:.2f}k", f"{lam:.4f}", f"{clean:.4f}",
                     f"{avg:.2f} ± 0.67", "94.0 s", b0["config_hash"]]
    assert "| rho1 | 0 | 2/2 |" in md
    for m in METHODS:
        assert f"| {m} | mean of 2 |" in md
    assert "## Per task (final round" in md and "| winogrande | acc_norm |" in md
    # eval-vs-tokens: one row per evaluated round, values from that round's eval/results.json
    curves = {(c["method"], c["seed"], c["round"]): c for c in res["curves"]}
    r1 = read_json(reported_run / "bliss/seed0/round1/eval/results.json")
    assert curves[("bliss", 0, 1)]["tokens"] == r1["tokens"] < curves[("bliss", 0, 2)]["tokens"]
    assert curves[("bliss", 0, 1)]["val_loss"] == pytest.approx(r1["val_loss"])
    section = md[md.index("## Evaluation vs tokens"):]
    assert sum(1 for line in section.splitlines() if line.startswith("| bliss |")) == 4  # 2 seeds x 2 rounds
    # the markdown table is in the report too
    assert "results.md" in (reported_run / "report.html").read_text()
    assert "| bliss | 0 | 2/2 |" in (reported_run / "report.html").read_text()


def test_report_regenerates_from_directory_alone(fake_run, tmp_path):
    from lmselect.cli import main

    first = write_report(fake_run)
    before_json = (fake_run / "results.json").read_bytes()
    before_md = (fake_run / "results.md").read_text()
    figs = sorted(p.name for p in (fake_run / "figures").glob("*.png"))
    # move the run elsewhere and delete every output: the report comes back from the artifacts alone
    moved = tmp_path / "elsewhere" / "RUN"
    moved.parent.mkdir()
    shutil.move(str(fake_run), str(moved))
    for p in ("report.html", "results.json", "results.md"):
        (moved / p).unlink()
    shutil.rmtree(moved / "figures")
    assert not first.exists()
    assert main(["report", str(moved)]) == 0
    assert (moved / "results.json").read_bytes() == before_json
    assert (moved / "results.md").read_text() == before_md
    assert sorted(p.name for p in (moved / "figures").glob("*.png")) == figs
    html = (moved / "report.html").read_text()
    assert len(data_uris(html)) == len(figs)
    assert "All recorded parents match" in html  # parents resolved inside the moved directory


def test_missing_pieces_are_skipped_with_notes(fake_run):
    # a run in progress: no run manifest, bliss seed1 round2 not started, rho1 without evals, mates without scores
    # and selections, a blade target still training (no manifest), no downstream eval anywhere
    (fake_run / "manifest.json").unlink()
    shutil.rmtree(fake_run / "bliss/seed1/round2")
    for d in fake_run.glob("rho1/seed*/round*/eval"):
        shutil.rmtree(d)
    for d in [*fake_run.glob("mates/seed*/round*/scores"), *fake_run.glob("mates/seed*/round*/selection")]:
        shutil.rmtree(d)
    (fake_run / "blade/seed0/round2/target/manifest.json").unlink()
    (fake_run / "blade/seed0/round2/manifest.json").unlink()
    for p in fake_run.glob("*/seed*/round*/eval/results.json"):
        r = json.loads(p.read_text())
        r["downstream"] = None
        p.write_text(json.dumps(r))

    # and some damaged files: an unreadable summary, a garbage scores part
    (fake_run / "random/seed0/round1/selection/summary.json").write_text("{not json")
    next((fake_run / "bliss/seed0/round1/scores").glob("part-*.parquet")).write_bytes(b"garbage")

    out = write_report(fake_run)
    html = out.read_text()
    assert "ignored unreadable" in html and "random/seed0/round1/selection/summary.json: invalid JSON" in html
    assert "examples skipped for bliss/seed0/round1: scores not readable" in html
    assert "<h3>bliss, round 2 (seed 0) · selection keeps the highest scores</h3>" in html  # other rounds still shown
    figs = {p.stem for p in (fake_run / "figures").glob("*.png")}
    assert figs == EXPECTED_FIGURES - {"score_hist_mates", "source_rates_mates"}
    assert len(data_uris(html)) == len(figs)
    assert "score histogram skipped for mates" in html
    assert "selection rate per source skipped for mates: no sequence selection" in html
    assert "downstream accuracy not plotted" in html
    assert "bliss/seed1/round2 is missing" in html and "blade/seed0/round2 is partial" in html
    assert "run manifest absent" in html
    res = read_json(fake_run / "results.json")
    rows = {(r["method"], r["seed"]): r for r in res["rows"]}
    assert rows[("rho1", 0)]["final_round"] is None and rows[("rho1", 0)]["tokens"] is None
    assert rows[("bliss", 1)]["final_round"] == 1 and rows[("bliss", 1)]["rounds_done"] == 1
    assert rows[("bliss", 1)]["rounds_expected"] == 2
    # the round-2 eval is complete, so it counts; provenance flags that its target is being rebuilt
    assert rows[("blade", 0)]["final_round"] == 2
    assert "blade/seed0/round2/eval: parent checkpoint" in html and "incomplete (no complete manifest)" in html
    assert rows[("bliss", 0)]["downstream_average"] is None
    md = (fake_run / "results.md").read_text()
    assert "| bliss | 1 | 1/2 |" in md and "| rho1 | 0 | 2/2 | – | – | – | – |" in md
    # the still-training blade target's log is plotted (logs are read without a manifest)
    data = collect(fake_run)
    assert data.rounds["blade"][0][2].train_log and "target" not in data.rounds["blade"][0][2].stage_manifests


def test_report_on_a_run_that_has_not_started(tmp_path):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"methods": ["bliss", "random"], "seeds": [3], "rounds": 2}))
    html = write_report(run).read_text()
    assert "rounds: 0 done, 0 partial, 4 missing" in html
    assert "no complete eval results yet" in html and "no target train_log.jsonl" in html
    assert "examples skipped: no complete scores" in html
    assert list((run / "figures").glob("*.png")) == []
    res = read_json(run / "results.json")
    assert [(r["method"], r["seed"], r["rounds_done"]) for r in res["rows"]] == []


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    from lmselect.cli import main

    with pytest.raises(LmselectError, match="not a run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such run directory" in err and len(err.strip().splitlines()) == 1


def test_examples_are_decoded_with_the_pool_tokenizer_and_escaped(reported_run):
    from lmselect.data.pool import TokenPool

    data = collect(reported_run)
    exs = examples(data, n=3, max_chars=40)
    assert [(e["method"], e["round"], e["seed"]) for e in exs] == [
        ("bliss", 1, 0), ("bliss", 2, 0), ("mates", 1, 0), ("mates", 2, 0)
    ]
    pool = TokenPool(reported_run / "pool")
    for e in exs:
        assert len(e["top"]) == 3 and len(e["bottom"]) == 3
        assert [x.score for x in e["top"]] == sorted((x.score for x in e["top"]), reverse=True)
        assert min(x.score for x in e["top"]) > max(x.score for x in e["bottom"])
        for x in e["top"] + e["bottom"]:
            full = pool.decode(x.seq_id)
            assert x.text == (full[:40] + " …" if len(full) > 40 else full)
    src = lambda ids: set(pool.sources(np.array(ids)).tolist())  # noqa: E731
    bliss = [e for e in exs if e["method"] == "bliss"]
    # the synthetic BLISS score model prefers wiki and dislikes spam; top sequences are the selected ones
    assert all(src([x.seq_id for x in e["top"]]) == {"wiki"} for e in bliss)
    assert all(src([x.seq_id for x in e["bottom"]]) == {"spam"} for e in bliss)
    assert all(x.selected for e in bliss for x in e["top"]) and not any(x.selected for e in bliss for x in e["bottom"])
    # MATES keeps the lowest predicted loss: its lowest-scored examples are the selected ones
    mates = [e for e in exs if e["method"] == "mates"]
    assert all(x.selected for e in mates for x in e["bottom"])
    assert [e["keeps"] for e in exs] == ["highest", "highest", "lowest", "lowest"]  # summary.largest / inferred
    html = (reported_run / "report.html").read_text()
    assert "Click &lt;b&gt;here&lt;/b&gt; &amp; win" in html and "<b>here</b>" not in html


def test_concat_logs_continues_restarted_rounds():
    warm = [{"step": s, "loss": 5.0, "tokens": 100 * s} for s in (1, 2)]
    r1 = [{"step": s, "loss": 4.0, "tokens": 200 + 100 * s} for s in (1, 2)]  # cumulative tokens
    r2 = [{"step": s, "loss": 3.0, "tokens": 100 * s} for s in (1, 2)]  # restarts at 0
    segs, starts, xlabel = concat_logs([warm, r1, r2], "loss")
    assert xlabel == "tokens"
    assert [s[0] for s in segs] == [[100.0, 200.0], [300.0, 400.0], [500.0, 600.0]]
    assert starts == [100.0, 300.0, 500.0]
    segs, _, xlabel = concat_logs([r1, [{"step": 1, "loss": 2.0}]], "loss")  # a record without tokens -> steps
    assert xlabel == "steps" and segs[1][0] == [3.0]
    # the training loop's format: a start event without a loss, tokens_seen, selector stats prefixed sel_
    loop = [{"step": 0, "event": "start"}, *({"step": s, "tokens_seen": 50 * s, "sel_kept_fraction": 0.6} for s in (1, 2))]
    segs, starts, xlabel = concat_logs([warm, loop], ("kept_fraction", "sel_kept_fraction"))
    assert xlabel == "tokens" and segs == [([], []), ([50.0, 100.0], [0.6, 0.6])] and starts == [50.0]
    segs, _, xlabel = concat_logs([warm, loop], "loss")
    assert xlabel == "tokens" and segs[1] == ([], [])


def test_stage_seconds():
    assert stage_seconds({"total": 5.0, "solve": 4.0}) == 5.0
    assert stage_seconds({"solve": 4.0, "score": 1.5}) == 5.5
    assert stage_seconds({}) is None and stage_seconds(None) is None
