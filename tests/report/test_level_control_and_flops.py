"""Report additions for the baselines: bits per byte beside the loss, FLOPs as a multiple of plain training, and
token-level methods paired with the random token mask as well as with random."""

from __future__ import annotations

import pytest

from lmselect.report.results import _paired_vs_level_controls, flops_multiple, headline_sections, paired_differences


def _row(method, seed, loss, bpb):
    return {"method": method, "seed": seed, "val_loss": {"lambada": loss}, "val_bpb": {"lambada": bpb},
            "downstream_average": None}


ROWS = [_row("random", s, 3.0 + 0.1 * s, 1.2) for s in range(3)] + \
       [_row("random_tokens", s, 2.9 + 0.1 * s, 1.1) for s in range(3)] + \
       [_row("rho1", s, 2.8 + 0.1 * s + 0.01 * s * s, 1.0) for s in range(3)] + \
       [_row("dsir", s, 2.95 + 0.1 * s, 1.15) for s in range(3)]


def test_token_methods_are_paired_with_the_random_mask_only():
    from lmselect.select.base import level_control_name

    assert level_control_name("token") == "random_tokens" and level_control_name("sequence") is None
    out = _paired_vs_level_controls(ROWS)
    assert set(out) == {"random_tokens"} and set(out["random_tokens"]) == {"rho1"}  # dsir is sequence-level
    d = out["random_tokens"]["rho1"]["val_loss.lambada"]
    assert d["n"] == 3 and d["mean"] == pytest.approx((-0.1 - 0.09 - 0.06) / 3)
    assert out["random_tokens"]["rho1"]["val_bpb.lambada"]["mean"] == pytest.approx(-0.1)
    # and the usual pairing with random still holds for every method
    assert set(paired_differences(ROWS)) == {"random_tokens", "rho1", "dsir"}


def test_flops_multiple():
    assert flops_multiple({"target_flops": 6.0, "scoring_flops": 2.0, "selection_flops": 4.0}) == 2.0
    assert flops_multiple({"target_flops": 6.0, "selection_flops": 0.0}) == 1.0
    assert flops_multiple({"selection_flops": 3.0}) is None


def test_sections_show_bpb_the_level_control_table_and_the_multiple():
    agg = {"n_seeds": 3, "val_loss": {"lambada": 3.0}, "val_loss_sd": {"lambada": 0.1}, "val_bpb": {"lambada": 1.2},
           "val_bpb_sd": {"lambada": 0.01}, "downstream_average": None, "downstream_average_sd": None,
           "exposure": {"tokens_fed": 10, "flops_multiple": 1.84}}
    res = {"methods": {"rho1": agg}, "rows": ROWS, "paired_vs_random": paired_differences(ROWS),
           "paired_vs_level_control": _paired_vs_level_controls(ROWS), "diagnostics": {}}
    secs = {s["title"]: s for s in headline_sections(res)}
    summary = next(s for t, s in secs.items() if t.startswith("Final round"))
    assert summary["header"][2:4] == ["lambada loss (report set)", "lambada bits/byte"]
    assert summary["rows"][0][3] == "1.2000 ± 0.0100"
    ctrl = next(s for t, s in secs.items() if t.startswith("Paired difference to random_tokens"))
    assert [r[0] for r in ctrl["rows"]] == ["rho1"] and "Δ lambada bits/byte" in ctrl["header"]
    expo = next(s for t, s in secs.items() if t.startswith("Exposure"))
    assert "1.84×" in expo["rows"][0]


def test_compare_adds_the_controls_of_the_levels_it_runs():
    from lmselect.compare import with_controls

    assert with_controls(["fasttext", "dsir"]) == ["random", "fasttext", "dsir"]
    assert with_controls(["rho1", "blade"]) == ["random", "rho1", "blade", "random_tokens"]
    assert with_controls(["random_tokens", "rho1"]) == ["random", "random_tokens", "rho1"]


def test_every_method_is_paired_with_the_best_cheap_baseline():
    from lmselect.report.results import _paired_vs_best_baseline
    from lmselect.select.base import baseline_names

    assert baseline_names() == ["dsir", "fasttext"]
    # fasttext is worse than dsir on the first report set: dsir is the baseline every method is paired with
    rows = ROWS + [_row("fasttext", s, 3.05 + 0.1 * s, 1.25) for s in range(3)]
    out = _paired_vs_best_baseline(rows)
    assert out["baseline"] == "dsir" and out["metric"] == "val_loss.lambada"
    assert out["means"]["fasttext"] == pytest.approx(3.15) and out["means"]["dsir"] == pytest.approx(3.05)
    assert set(out["paired"]) == {"random", "random_tokens", "rho1", "fasttext"}
    d = out["paired"]["rho1"]["val_loss.lambada"]
    assert d["mean"] == pytest.approx(((2.8 - 2.95) + (2.91 - 3.05) + (3.04 - 3.15)) / 3)
    assert out["paired"]["random"]["val_loss.lambada"]["mean"] == pytest.approx(0.05)
    # the other way round when fasttext is better
    rows = ROWS + [_row("fasttext", s, 2.5 + 0.1 * s, 1.0) for s in range(3)]
    assert _paired_vs_best_baseline(rows)["baseline"] == "fasttext"
    # no baseline in the run: no table
    assert _paired_vs_best_baseline([r for r in ROWS if r["method"] != "dsir"]) == {}
    res = {"methods": {}, "rows": rows, "paired_vs_random": paired_differences(rows),
           "paired_vs_level_control": {}, "paired_vs_best_baseline": _paired_vs_best_baseline(rows),
           "diagnostics": {}}
    sec = next(s for s in headline_sections(res) if s["title"].startswith("Paired difference to the best cheap"))
    assert "fasttext" in sec["title"] and "dsir 3.0500" in sec["note"] and "fasttext 2.6000" in sec["note"]
    assert {r[0] for r in sec["rows"]} == {"random", "random_tokens", "rho1", "dsir"}
