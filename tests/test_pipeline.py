"""The multi-round runner: every method end to end on the debug preset, resume after a crash, recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmselect.artifacts import is_complete, read_manifest
from lmselect.config import ConfigError
from lmselect.select.base import method_class, method_names
from lmselect.testing import make_tokenizer


def _selections(run_dir: Path, method: str, rounds: int = 2) -> list[np.ndarray]:
    return [np.load(run_dir / method / "seed0" / f"round{r}" / "selection" / "selected.npy") for r in range(1, rounds + 1)]


def test_every_method_runs_end_to_end(all_methods_run):
    out = all_methods_run
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(method_names())
    for m in res["methods"]:
        for r in (1, 2):
            assert is_complete(out / m / "seed0" / f"round{r}", kind="round"), (m, r)
        ev = json.loads((out / m / "seed0" / "round2" / "eval" / "results.json").read_text())
        assert np.isfinite(ev["val_loss"]["lambada"]) and np.isfinite(ev["val_loss"]["clean"])
        assert ev["val_split"] == "report"
        assert set(ev["val_bpb"]) == {"lambada", "clean"} and all(v > 0 for v in ev["val_bpb"].values())
        # the exposure ledger: what the method was given this round
        ex = ev["exposure"]
        assert ex["tokens_fed"] == 2 * 4 * 32 and ex["candidates"] == 12
        level = method_class(m).level
        assert ex["selected_sequences"] == (12 if level == "token" else 3)
        assert ex["epochs"] == pytest.approx(8 / ex["selected_sequences"])
        if level == "token":
            assert 0.5 < ex["kept_token_fraction"] < 0.7 and ex["tokens_backprop"] < 8 * 31
        else:
            assert ex["tokens_backprop"] == 8 * 31
        # only the controls (random selection, the random token mask, the known-answer arms, which read source labels
        # and token counts) select at no FLOPs of their own
        cls = method_class(m)
        assert (ex["selection_flops"] == 0) == bool(cls.control or cls.level_control or cls.known_answer)
        # the loop's no-grad scoring pass: token-level methods that read the target's CE; the random mask needs none
        scoring = read_manifest(out / m / "seed0" / "round2" / "target")["extra"]["scoring_forward"]
        assert scoring == (level == "token" and not method_class(m).level_control), m
        assert ex["target_flops"] > 0 and (ex["scoring_flops"] > 0) == scoring
    # equal token budget: every method trained the target for the same number of tokens
    tokens = {m: read_manifest(out / m / "seed0" / "round2" / "target")["extra"]["tokens_seen"] for m in res["methods"]}
    assert len(set(tokens.values())) == 1, tokens
    # sequence-level methods keep 25 % of a 12-sequence shard; token-level ones see the whole shard
    for m in res["methods"]:
        k = 12 if method_class(m).level == "token" else 3
        assert [len(s) for s in _selections(out, m)] == [k, k], m
    # round r draws from shard r only
    from lmselect.data.pool import TokenPool

    pool = TokenPool(Path(read_manifest(out)["config"]["pool"]["path"]))
    for m in res["methods"]:
        for r, sel in enumerate(_selections(out, m), start=1):
            assert set(pool.shard[sel]) == {r}
    # the BLISS score model is inherited across rounds, the proxy reset: round 2's solve starts from round 1's scorer
    assert (out / "bliss" / "seed0" / "round2" / "bilevel" / "score_model").is_dir()
    # the default profile's score head (the paper's sigmoid), saved with the model and inherited by round 2
    for r in (1, 2):
        meta = json.loads((out / "bliss" / "seed0" / f"round{r}" / "bilevel" / "score_model" / "scorer.json").read_text())
        assert meta["activation"] == "sigmoid"
    # rank stability: round 2's selection diagnostics compare round 1's and round 2's score models on the same
    # candidates (all 12 here); round 1 has no previous scorer
    d1, d2 = (json.loads((out / "bliss" / "seed0" / f"round{r}" / "selection" / "diagnostics.json").read_text())
              for r in (1, 2))
    stab = d2["rank_stability"]
    assert "rank_stability" not in d1 and stab["n"] == 12 and stab["scorers"] == "round 1 vs round 2"
    assert stab["spearman_prev_round"] is not None and -1.0 <= stab["spearman_prev_round"] <= 1.0
    assert res["diagnostics"]["bliss"]["2"]["selection"]["rank_stability"] == stab
    # token-level methods logged their kept fraction, in training and in the evaluation's decay branch alike
    for sub in ("target", "decay_branch"):
        log = [json.loads(x) for x in (out / "rho1" / "seed0" / "round1" / sub / "train_log.jsonl").read_text().splitlines()]
        kept = [r.get("sel_kept_fraction", r.get("kept_fraction")) for r in log if "loss" in r]
        assert kept and all(abs(k - 0.6) < 0.05 for k in kept if k is not None), sub
    assert (out / "comparison.md").is_file() and (out / "comparison.png").stat().st_size > 1000
    table = (out / "comparison.md").read_text()
    for m in res["methods"]:
        assert f"| {m} |" in table
    assert "Paired difference to random" in table and "Exposure" in table
    # one seed: no interval, so every difference is "within noise"
    assert all(v["within_noise"] for d in res["paired_vs_random"].values() for v in d.values())


def test_interrupted_run_resumes_to_same_selection(tiny_recipe, tmp_path, monkeypatch):
    from lmselect import pipeline
    from lmselect.recipe import load_recipe

    recipe = load_recipe(tiny_recipe)
    ref_dir, _ = pipeline.run_recipe(recipe, tmp_path / "ref", report=False)

    # crash in round 2's training of BLISS (after round 2's bilevel solve, scoring and selection were written)
    orig = pipeline.Runner.stage_train

    def crashing(self, m, rc, selected):
        if m.name == "bliss" and rc.round == 2:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, m, rc, selected)

    monkeypatch.setattr(pipeline.Runner, "stage_train", crashing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(load_recipe(tiny_recipe), tmp_path / "run", report=False)
    assert not is_complete(tmp_path / "run" / "bliss" / "seed0" / "round2", kind="round")
    assert not is_complete(tmp_path / "run", kind="run")
    monkeypatch.setattr(pipeline.Runner, "stage_train", orig)

    # rerunning finishes only what is missing: round 1 is not redone
    r1 = tmp_path / "run" / "bliss" / "seed0" / "round1" / "manifest.json"
    before = r1.stat().st_mtime_ns
    pipeline.run_recipe(load_recipe(tiny_recipe), tmp_path / "run", report=False)
    assert r1.stat().st_mtime_ns == before
    for m in ("random", "bliss"):
        for a, b in zip(_selections(ref_dir, m), _selections(tmp_path / "run", m)):
            assert np.array_equal(a, b), m
    ea = json.loads((ref_dir / "bliss" / "seed0" / "round2" / "eval" / "results.json").read_text())["val_loss"]
    eb = json.loads((tmp_path / "run" / "bliss" / "seed0" / "round2" / "eval" / "results.json").read_text())["val_loss"]
    assert ea == pytest.approx(eb, rel=1e-6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("--target.preset=pythia-7b", "target.preset"),
        ("--methods=random,magic", "methods"),
        ("--select_fraction=1.5", "select_fraction"),
        ("--select_fraction=0", "select_fraction"),
        ("--validation.lambada=/nonexistent/val.jsonl", "validation.lambada"),
        ("--rounds=0", "rounds"),
        ("--round_steps=-5", "round_steps"),
        ("--warmup.steps=0", "warmup.steps"),
        ("--seeds=0,0", "seeds"),
        ("--validation.selection_kind=words", "validation.selection_kind"),
        ("--bliss.outer_steps=0", "bliss.outer_steps"),
        ("--bliss.objective=final", "bliss.objective"),
        ("--mates.temperature=0", "mates.temperature"),
        ("--perplexity.band=mid", "perplexity.band"),
        ("--bliss.z_stepz=3", "bliss.z_stepz"),
    ],
)
def test_bad_recipe_fails_at_load_naming_the_key(tiny_recipe, override, key):
    from lmselect.recipe import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe(tiny_recipe, [override])
    assert key in str(e.value) and "\n" not in str(e.value)
    if key not in ("bliss.z_stepz", "bliss.objective"):  # range / file errors say where the value came from
        assert "command line" in str(e.value), str(e.value)


def test_unknown_method_suggests_the_closest_name(tiny_recipe):
    from lmselect.recipe import load_recipe

    with pytest.raises(ConfigError, match="did you mean 'bliss'"):
        load_recipe(tiny_recipe, ["--methods=random,blis"])


def test_overlapping_selection_and_report_sets_are_refused(tiny_recipe, tmp_path):
    """A report set must be disjoint from everything a method sees, by item content (whitespace-normalised)."""
    from lmselect.recipe import load_recipe
    from lmselect.testing import REPORT_LAMBADA, SAMPLE_LAMBADA, write_jsonl_texts

    leaky = write_jsonl_texts(tmp_path / "leaky.jsonl", SAMPLE_LAMBADA[:2] + ["  " + REPORT_LAMBADA[3].replace(" ", "  ")])
    with pytest.raises(ConfigError) as e:
        load_recipe(tiny_recipe, [f"--validation.selection={leaky}"])
    msg = str(e.value)
    assert "validation.selection" in msg and "validation.lambada" in msg and "1 item" in msg and "\n" not in msg
    # RHO-1's reference corpus is checked too
    with pytest.raises(ConfigError, match="rho1 data file"):
        load_recipe(tiny_recipe, [f"--rho1.files=[{tmp_path / 'leaky.jsonl'}]", "--methods=random,rho1"])


def test_cli_reports_bad_recipe_in_one_line(tiny_recipe, capsys):
    from lmselect.cli import main

    assert main(["run", str(tiny_recipe), "--select_fraction=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "select_fraction" in err


def test_tokenizer_mismatch_is_refused_before_compute(tiny_recipe, tmp_path):
    from lmselect.artifacts import LmselectError
    from lmselect.models import build_model
    from lmselect.pipeline import Runner
    from lmselect.recipe import load_recipe

    other = make_tokenizer(vocab_size=300)
    other.add_tokens(["<extra_token>"])
    ck = tmp_path / "foreign"
    build_model("debug", len(other)).save_pretrained(ck)
    other.save_pretrained(ck)
    r = load_recipe(tiny_recipe, [f"--proxy.init_from={ck}"])
    runner = Runner(r, tmp_path / "run")
    with pytest.raises(LmselectError, match="tokenizer mismatch"):
        runner.check_tokenizers()


def test_embedded_demo_recipe_is_valid():
    from lmselect.recipe import load_recipe

    r = load_recipe("demo")
    assert r.methods == ["random", "bliss"] and r.rounds == 2
    assert r.pool.prepare.n_shards == r.rounds + 1
    assert Path(r.validation.lambada).is_file() and Path(r.validation.clean).is_file()
    assert Path(r.validation.selection).name == "lambada_select.jsonl"


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_parses(name):
    """Recipes are typed: a stale key in a shipped recipe fails here, not on a user's cluster."""
    from lmselect.config import load_config
    from lmselect.models.presets import get_preset
    from lmselect.paths import RECIPES_DIR
    from lmselect.recipe import Recipe

    r = load_config(Recipe, RECIPES_DIR / name)
    get_preset(r.target.preset), get_preset(r.proxy.preset)
    assert set(r.methods) <= set(method_names()) and 0 < r.select_fraction <= 1


def test_bliss_rounds_reset_proxy_inherit_scorer_and_use_previous_target(tiny_recipe, tmp_path, monkeypatch):
    """METHODS §1.3a: proxy reset to the warm-up proxy each round; score model inherited from round r-1 (round 1:
    the warm-up proxy's backbone); KL teacher = the target at the end of round r-1. Checked on the objects the
    solver actually receives, against the checkpoints on disk."""
    import torch

    from lmselect import pipeline
    from lmselect.models.scorer import SequenceScorer
    from lmselect.recipe import load_recipe
    from lmselect.select.bliss import method as bliss
    from lmselect.train.checkpoint import load_checkpoint_model

    seen: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    real = bliss.solve_round

    def spy(cfg, proxy, target, scorer, train_ids, pool, valset, out_dir, **kw):
        rnd = int(Path(out_dir).parent.name.removeprefix("round"))
        clone = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        seen[rnd] = {"proxy": clone(proxy), "target": clone(target), "scorer": clone(scorer)}
        return real(cfg, proxy, target, scorer, train_ids, pool, valset, out_dir, **kw)

    monkeypatch.setattr(bliss, "solve_round", spy)
    run = tmp_path / "run"
    pipeline.run_recipe(load_recipe(tiny_recipe, ["--methods=bliss"]), run, report=False)

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    warm_proxy = load_checkpoint_model(run / "warmup" / "proxy").state_dict()
    for rnd in (1, 2):
        assert same(seen[rnd]["proxy"], warm_proxy), f"round {rnd}: proxy not reset to the warm-up proxy"
    assert same(seen[1]["target"], load_checkpoint_model(run / "warmup" / "target").state_dict())
    assert same(seen[2]["target"], load_checkpoint_model(run / "bliss/seed0/round1/target").state_dict())
    # round 1: scorer backbone = warm-up proxy; round 2: the score model round 1 ended with
    backbone1 = {k.removeprefix("lm."): v for k, v in seen[1]["scorer"].items() if k.startswith("lm.")}
    assert same(backbone1, warm_proxy)
    r1_scorer = SequenceScorer.load(run / "bliss/seed0/round1/bilevel/score_model").state_dict()
    assert same(seen[2]["scorer"], r1_scorer)
    assert not same(seen[2]["scorer"], seen[1]["scorer"])  # the solve really changed it
