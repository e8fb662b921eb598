"""bench/compare_power.py's results file is made from the comparison's own tables: the plain-words verdict names
each control's detection and each method's beyond-noise differences, and the file names the methods left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("compare_power", ROOT / "bench" / "compare_power.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, seed, loss):
    return {"method": method, "seed": seed, "val_loss": {"lambada": loss}, "val_bpb": {}, "downstream_average": None}


def test_verdict_and_sections_come_from_the_tables():
    from lmselect.report.results import (
        _with_power,
        headroom,
        known_answer_verdicts,
        noise_floors,
        paired_differences,
    )

    rows = ([_row("random", s, 3.0 + 0.1 * s) for s in range(3)]
            + [_row("control_positive", s, 2.5 + 0.1 * s + 0.01 * s * s) for s in range(3)]
            + [_row("control_negative", s, 3.0 + 0.1 * s + 0.01 * (s % 2)) for s in range(3)]
            + [_row("bliss", s, 3.3 + 0.1 * s + 0.01 * s * s) for s in range(3)])
    paired = _with_power(paired_differences(rows), noise_floors(rows))
    res = {"methods": {}, "rows": rows, "paired_vs_random": paired, "noise_floor": noise_floors(rows),
           "known_answer_controls": known_answer_verdicts(paired), "headroom": headroom(rows), "diagnostics": {}}
    bench = _bench()
    lines = bench.verdict("pythia-14m", res)
    assert "pythia-14m: the positive control (control_positive) is detected beyond noise on lambada loss." in lines
    assert "pythia-14m: the negative control (control_negative) is not detected beyond noise on any metric." in lines
    assert any(x.startswith("pythia-14m: bliss differs from random beyond noise on lambada loss +0.3167 [+0.2650, +0.3684] +2.2σ worse") for x in lines)
    text = bench.sections(res)
    assert "#### What this comparison can detect" in text and "#### Headroom" in text
    assert "#### Known-answer controls" in text
    assert bench.left_out("random,bliss,dsir")[:2] == ["mates", "rho1"] and "control_positive" not in bench.left_out("")
