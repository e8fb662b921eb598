"""Provenance: stage status (done / partial / missing), lineage tree and changed-parent flags."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lmselect.artifacts import LmselectError, Manifest, read_manifest, write_manifest
from lmselect.provenance import (
    format_lineage,
    lineage,
    print_lineage,
    run_plan,
    stage_status,
    stale_artifacts,
)


def _rewrite_with_new_uuid(d):
    """Rebuild an artifact's manifest as a rerun would: same content, fresh uuid."""
    old = read_manifest(d)
    write_manifest(d, Manifest(kind=old["kind"], config=old["config"], seed=old["seed"], parents=old["parents"],
                               versions=old["versions"]))
    new = read_manifest(d)
    assert new["uuid"] != old["uuid"]
    return old["uuid"], new["uuid"]


def test_stage_status_complete_run(fake_run_base):
    st = stage_status(fake_run_base)
    assert st["run"] == "done" and st["pool"] == "done"
    assert st["warmup"] == {"target": "done", "proxy": "done"}
    assert list(st["rounds"]) == ["random", "bliss", "mates", "rho1", "blade"]
    assert st["counts"] == {"done": 20, "partial": 0, "missing": 0}
    assert st["rounds"]["bliss"][1][2] == {
        "status": "done",
        "stages": {s: "done" for s in ("bilevel", "scores", "selection", "target", "eval")},
    }
    assert list(st["rounds"]["rho1"][0][1]["stages"]) == ["selection", "target", "eval"]  # from the registry
    assert list(st["rounds"]["mates"][0][1]["stages"]) == ["influence", "scores", "selection", "target", "eval"]


def test_stage_status_partial_and_missing(fake_run):
    (fake_run / "manifest.json").unlink()  # run in progress
    (fake_run / "bliss/seed0/round2/manifest.json").unlink()  # round not finished ...
    shutil.rmtree(fake_run / "bliss/seed0/round2/eval")  # ... its eval not started
    (fake_run / "bliss/seed0/round2/target/manifest.json").unlink()  # ... its target still training
    m = json.loads((fake_run / "mates/seed1/round1/scores/manifest.json").read_text())
    m["status"] = "partial"
    (fake_run / "mates/seed1/round1/scores/manifest.json").write_text(json.dumps(m))
    shutil.rmtree(fake_run / "rho1/seed1/round2")
    shutil.rmtree(fake_run / "warmup/proxy")
    cfg = yaml.safe_load((fake_run / "config.yaml").read_text())
    cfg["seeds"] = [0, 1, 2]  # config extended: seed 2 planned, not run
    (fake_run / "config.yaml").write_text(yaml.safe_dump(cfg))

    st = stage_status(fake_run)
    assert st["run"] == "partial" and st["warmup"] == {"target": "done", "proxy": "missing"}
    r = st["rounds"]
    assert r["bliss"][0][2]["status"] == "partial"
    assert r["bliss"][0][2]["stages"] == {"bilevel": "done", "scores": "done", "selection": "done",
                                          "target": "partial", "eval": "missing"}
    assert r["mates"][1][1]["status"] == "done" and r["mates"][1][1]["stages"]["scores"] == "partial"
    assert r["rho1"][1][2] == {"status": "missing", "stages": {"selection": "missing", "target": "missing", "eval": "missing"}}
    for method in ("random", "bliss", "mates", "rho1", "blade"):
        assert r[method][2] == {
            k: {"status": "missing", "stages": {s: "missing" for s in r[method][0][k]["stages"]}} for k in (1, 2)
        }
    assert st["counts"] == {"done": 18, "partial": 1, "missing": 11}
    text = format_lineage(fake_run)
    assert "bliss   seed0  round2  partial  bilevel=done scores=done selection=done target=partial eval=missing" in text
    assert "rounds: 18 done, 1 partial, 11 missing" in text


def test_run_plan_sources(fake_run):
    assert run_plan(fake_run).methods == ["random", "bliss", "mates", "rho1", "blade"]
    assert run_plan(fake_run).rounds == [1, 2]
    (fake_run / "config.yaml").write_text(yaml.safe_dump({"pipeline": {"methods": "bliss,random", "seeds": 2,
                                                                       "rounds": 3}, "seed": 5}))
    plan = run_plan(fake_run)
    assert (plan.methods, plan.seeds, plan.rounds) == (["bliss", "random"], [5, 6], [1, 2, 3])
    (fake_run / "config.yaml").unlink()  # falls back to the run manifest
    plan = run_plan(fake_run)
    assert (plan.methods, plan.seeds, plan.rounds) == (["random", "bliss", "mates", "rho1", "blade"], [0, 1], [1, 2])
    (fake_run / "config.yaml").write_text("methods: [bliss\n")
    with pytest.raises(LmselectError, match="config.yaml: invalid YAML"):
        stage_status(fake_run)


def test_lineage_tree_of_complete_run(fake_run_base, capsys):
    root = lineage(fake_run_base)
    assert root.kind == "run" and root.status == "done"
    kinds = {n.rel: n.kind for n in root.walk()}
    assert kinds["pool"] == "pool" and kinds["warmup/target"] == "checkpoint"
    assert kinds["bliss/seed0/round1/bilevel"] == "bilevel" and kinds["mates/seed1/round2/influence"] == "influence"
    assert kinds["bliss/seed0/round1"] == "round" and kinds["bliss"] is None
    assert sum(1 for n in root.walk() if n.kind is not None) == 1 + 1 + 2 + 20 + 4 * (3 + 5 + 5 + 3 + 3)
    assert not any(n.stale for n in root.walk())
    assert all(p.state == "ok" for n in root.walk() for p in n.parents)
    assert stale_artifacts(fake_run_base) == []
    print_lineage(fake_run_base)
    out = capsys.readouterr().out
    target = root.find("bliss/seed0/round1/target")
    assert f"checkpoint {target.uuid[:8]}  bliss/seed0/round1/target  [done]" in out
    assert "all recorded parents match their current manifests" in out and "STALE" not in out


def test_changed_parent_is_flagged(fake_run):
    sel = fake_run / "bliss/seed0/round1/selection"
    old, new = _rewrite_with_new_uuid(sel)
    stale = stale_artifacts(fake_run)
    # exactly the artifacts that recorded this selection as a parent
    assert sorted(n.rel for n, _ in stale) == ["bliss/seed0/round1", "bliss/seed0/round1/target"]
    for _, p in stale:
        assert p.state == "changed" and p.uuid == old and p.current_uuid == new and p.kind == "selection"
    node = lineage(fake_run).find("bliss/seed0/round1/target")
    assert node.stale and not lineage(fake_run).find("bliss/seed1/round1/target").stale
    text = format_lineage(fake_run)
    assert f"!! STALE: parent selection {old[:8]} changed (now {new[:8]})" in text
    assert "2 artifact parent link(s) changed since the artifact was made" in text


def test_missing_and_incomplete_parents_are_flagged(fake_run):
    shutil.rmtree(fake_run / "warmup/proxy")
    (fake_run / "mates/seed0/round1/influence/manifest.json").unlink()
    stale = {(n.rel, p.kind, p.state) for n, p in stale_artifacts(fake_run)}
    assert ("bliss/seed0/round1/bilevel", "checkpoint", "missing") in stale
    assert ("bliss/seed1/round2/bilevel", "checkpoint", "missing") in stale
    assert (".", "checkpoint", "missing") in stale  # the run manifest lists the warm-up proxy
    assert ("mates/seed0/round1/scores", "influence", "incomplete") in stale
    assert ("mates/seed0/round1", "influence", "incomplete") in stale
    assert not any(rel.startswith(("random", "rho1", "blade")) for rel, _, _ in stale)
    node = lineage(fake_run).find("mates/seed0/round1/influence")
    assert node.kind is None and node.status == "partial"


def test_copied_run_is_checked_against_its_own_artifacts(fake_run, tmp_path):
    copy = tmp_path / "copy" / "RUN"
    shutil.copytree(fake_run, copy)
    _rewrite_with_new_uuid(fake_run / "warmup/target")  # changing the original must not flag the copy
    assert stale_artifacts(copy) == []
    assert {"bliss/seed0/round1/bilevel", "random/seed0/round1/target"} <= {n.rel for n, _ in stale_artifacts(fake_run)}
    _rewrite_with_new_uuid(copy / "warmup/target")
    assert any(n.rel == "random/seed0/round1/target" for n, _ in stale_artifacts(copy))


def test_parent_path_is_resolved_when_a_stage_bears_a_method_name(tmp_path):
    """RUN/reference/seed0/reference: the ``reference`` method's seed stage bears the method's name, and the run sits
    below a directory that bears it too; the parent is found at the longest suffix that exists in the run."""
    from lmselect.artifacts import check_parents, parent_ref

    run = tmp_path / "reference" / "RUN"
    ref, child = run / "reference" / "seed0" / "reference", run / "reference" / "seed0" / "round1" / "scores"
    ref.mkdir(parents=True)
    child.mkdir(parents=True)
    write_manifest(ref, Manifest(kind="reference"))
    write_manifest(child, Manifest(kind="scores", parents=[parent_ref(ref)]))
    (got,) = check_parents(read_manifest(child), child, run)
    assert got.ok and got.resolved == ref
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cchild = copy / "reference" / "seed0" / "round1" / "scores"
    (got,) = check_parents(read_manifest(cchild), cchild, copy)
    assert got.ok and got.resolved == copy / "reference" / "seed0" / "reference"  # the copy's own, not the original


def test_print_lineage_of_one_artifact(fake_run, capsys):
    tgt = fake_run / "bliss/seed1/round2/target"
    print_lineage(tgt)
    out = capsys.readouterr().out
    assert out.startswith("Lineage (kind, uuid, path, status):\ncheckpoint ")
    assert "Parents:" in out and "<- selection" in out and "<- scores" in out and "<- bilevel" in out
    assert "<- pool" in out and "Stage status:" not in out and "!!" not in out
    old, _ = _rewrite_with_new_uuid(fake_run / "bliss/seed1/round2/scores")
    print_lineage(tgt)
    out = capsys.readouterr().out
    assert f"<- scores     {old[:8]}" in out and "!! CHANGED" in out
    assert "all recorded parents match" in out  # the target's own parents (selection, round-1 target) did not change
    print_lineage(fake_run / "bliss/seed1/round2/selection")
    assert "!! STALE: parent scores" in capsys.readouterr().out


def test_pool_referenced_from_config(tmp_path, tiny_tokenizer):
    from fake_run import make_fake_run

    run = make_fake_run(tmp_path / "RUN", tiny_tokenizer, methods=("random",), seeds=(0,), rounds=1, pool_in_run=False)
    assert not (run / "pool").exists()
    st = stage_status(run)
    assert st["pool"] == "done" and st["counts"] == {"done": 1, "partial": 0, "missing": 0}
    root = lineage(run)
    assert root.children[0].kind == "pool" and root.children[0].path == tmp_path / "RUN-pool"
    assert stale_artifacts(run) == []
    _rewrite_with_new_uuid(tmp_path / "RUN-pool")
    assert {n.rel for n, _ in stale_artifacts(run)} == {".", "warmup/target", "warmup/proxy",
                                                   "random/seed0/round1/selection"}


def test_lineage_errors(tmp_path):
    with pytest.raises(LmselectError, match="no such directory"):
        lineage(tmp_path / "nope")
    with pytest.raises(LmselectError, match="no such run directory"):
        stage_status(tmp_path / "nope")
