"""What a comparison can detect, on hand-made rows: the noise floor from random's seeds, the detectable effect beside
every paired Δ ("within noise (could detect ≥ X)"), the known-answer controls' verdicts and headroom shares, and the
continuous downstream metrics leading the tables."""

from __future__ import annotations

import math

import pytest

from lmselect.report.results import (
    _with_power,
    headline_sections,
    headroom,
    known_answer_verdicts,
    noise_floors,
    paired_differences,
)
from lmselect.stats import ratio_interval


def _row(method, seed, loss, prob, bpb):
    return {"method": method, "seed": seed, "val_loss": {"lambada": loss}, "val_bpb": {}, "downstream_average": 0.3,
            "downstream_prob": prob, "downstream_bpb": bpb}


# random: loss 3.0, 3.1, 3.2 (sd 0.1); the positive control clearly lower, the negative clearly higher; bliss within
# noise; P(correct) and bits/byte of the correct answer beside
ROWS = ([_row("random", s, 3.0 + 0.1 * s, 0.30 + 0.01 * s, 2.0) for s in range(3)]
        + [_row("control_positive", s, 2.5 + 0.1 * s + 0.01 * s * s, 0.40 + 0.012 * s, 1.8) for s in range(3)]
        + [_row("control_negative", s, 3.0 + 0.1 * s + 0.02 * (s % 2), 0.30 + 0.01 * s, 2.0) for s in range(3)]
        + [_row("bliss", s, 2.9 + 0.1 * s + 0.15 * (s % 2), 0.33 + 0.01 * s, 1.9 + 0.01 * s) for s in range(3)])


def test_noise_floor_and_detectable_effect_per_metric():
    nf = noise_floors(ROWS)
    assert list(nf)[:2] == ["downstream_prob", "downstream_bpb"]  # the continuous metrics lead
    lam = nf["val_loss.lambada"]
    assert lam["sd_control"] == pytest.approx(0.1) and lam["noise"] == pytest.approx(0.1 * math.sqrt(2))
    assert lam["n_seeds"] == 3 and lam["mde"] == pytest.approx((4.303 + 1.061) * 0.1 * math.sqrt(2) / math.sqrt(3))
    assert nf["downstream_bpb"]["noise"] == 0.0  # random's bits/byte does not move: a zero floor, reported as such


def test_every_paired_delta_carries_its_ratio_to_noise_and_within_noise_says_what_it_could_detect():
    paired = _with_power(paired_differences(ROWS), noise_floors(ROWS))
    b = paired["bliss"]["val_loss.lambada"]
    assert b["within_noise"] and b["ratio_to_noise"] == pytest.approx(b["mean"] / (0.1 * math.sqrt(2)))
    res = {"methods": {}, "rows": ROWS, "paired_vs_random": paired, "noise_floor": noise_floors(ROWS),
           "known_answer_controls": known_answer_verdicts(paired), "headroom": headroom(ROWS), "diagnostics": {}}
    secs = {s["title"].split(" (")[0]: s for s in headline_sections(res)}
    tab = secs["Paired difference to random"]
    assert tab["header"][1:3] == ["Δ 9-task P(correct)", "Δ 9-task bits/byte (correct answer)"]
    cell = dict(zip(tab["header"], next(r for r in tab["rows"] if r[0] == "bliss")))["Δ lambada loss"]
    mde = (4.303 + 1.061) * 0.1 * math.sqrt(2) / math.sqrt(3)
    assert cell.endswith(f"within noise (could detect ≥ {mde:.4f})") and "σ" in cell
    assert "What this comparison can detect" in secs


def test_controls_are_judged_on_their_known_side():
    paired = paired_differences(ROWS)
    v = known_answer_verdicts(paired)
    pos, neg = v["arms"]["control_positive"], v["arms"]["control_negative"]
    assert pos["kind"] == "positive" and "val_loss.lambada" in pos["detected_on"]
    assert "downstream_prob" in pos["detected_on"]
    assert neg["detected_on"] == [] and v["can_rank"] is True  # the negative control here is within noise
    # a positive control that is *worse* than random is on the wrong side, never "detected"
    flipped = [dict(r, val_loss={"lambada": 3.5 + 0.1 * r["seed"] + 0.01 * r["seed"] ** 2}) if r["method"] == "control_positive" else r
               for r in ROWS]
    vf = known_answer_verdicts(paired_differences(flipped))["arms"]["control_positive"]["metrics"]["val_loss.lambada"]
    assert vf == {"detected": False, "wrong_side": True}
    only = known_answer_verdicts(paired_differences([r for r in ROWS if r["method"] in ("random", "control_negative")]))
    assert only["can_rank"] is False
    res = {"methods": {}, "rows": ROWS, "paired_vs_random": paired, "known_answer_controls": only, "diagnostics": {}}
    sec = next(s for s in headline_sections(res) if s["title"].startswith("Known-answer controls"))
    assert any("nothing at this scale can be ranked" in b for b in sec["bullets"])


def test_headroom_is_the_share_of_the_positive_controls_delta():
    hr = headroom(ROWS)
    assert hr["positive_control"] == "control_positive" and set(hr["shares"]) == {"bliss"}
    share = hr["shares"]["bliss"]["val_loss.lambada"]
    dm = [-0.1, 0.05, -0.1]
    dp = [-0.5, -0.49, -0.46]
    assert share["ratio"] == pytest.approx(sum(dm) / sum(dp))
    assert share["ci95"] == pytest.approx(ratio_interval(dm, dp)["ci95"]) and share["seeds"] == [0, 1, 2]
    assert headroom([r for r in ROWS if r["method"] != "control_positive"]) == {}


def test_scale_agreement_counts_pairs_ordered_alike_and_names_the_seeds():
    from lmselect.compare import agreement_markdown, scale_agreement

    # scale B: bliss and random swap on the LAMBADA loss (bliss worse than random), every other order kept
    rows_b = [dict(r, val_loss={"lambada": r["val_loss"]["lambada"] + (0.3 if r["method"] == "bliss" else 0.0)})
              for r in ROWS if r["seed"] < 2]
    agr = scale_agreement({"debug": {"rows": ROWS}, "pythia-14m": {"rows": rows_b}})
    lam = agr["metrics"]["val_loss.lambada"]
    # arms: bliss, control_negative, control_positive, random -> 6 pairs; bliss moves from 2nd best to worst:
    # (bliss, random) and (bliss, control_negative) swap
    assert lam["pairs"] == 6 and lam["agree"] == 4 and lam["accuracy"] == pytest.approx(4 / 6)
    assert agr["metrics"]["downstream_prob"]["accuracy"] == 1.0
    assert agr["seeds"]["debug"]["bliss"] == [0, 1, 2] and agr["seeds"]["pythia-14m"]["bliss"] == [0, 1]
    md = agreement_markdown(agr)
    assert "| lambada loss | 4 | 0.67 (4/6) |" in md and "pythia-14m: bliss 2" in md
