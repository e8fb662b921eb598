"""Core contracts: config loading/overrides, atomic artifacts, pool round trip, presets."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from lmselect.artifacts import ArtifactError, Manifest, is_complete, read_manifest, write_manifest
from lmselect.config import ConfigError, config_hash, load_config, to_dict


@dataclass
class _Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class _Cfg:
    name: str = "x"
    steps: int = 10
    optim: _Optim = field(default_factory=_Optim)
    tags: list[str] = field(default_factory=list)


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(_Cfg, p, ["--optim.lr=3e-4", "--tags=a,b", "--name", "run"])
    assert cfg.steps == 20 and cfg.optim.lr == pytest.approx(3e-4) and cfg.tags == ["a", "b"] and cfg.name == "run"
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]
    assert config_hash(cfg) == config_hash(load_config(_Cfg, p, ["--tags=a,b", "--name=run", "--optim.lr=0.0003"]))


def test_config_unknown_key_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(_Cfg, p)
    with pytest.raises(ConfigError, match="steps"):
        load_config(_Cfg, None, ["--steps=abc"])


def test_manifest_marks_completion(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    assert not is_complete(d)
    with pytest.raises(ArtifactError, match="incomplete"):
        read_manifest(d)
    write_manifest(d, Manifest(kind="scores", config={"a": 1}, seed=3))
    m = read_manifest(d, kind="scores")
    assert m["seed"] == 3 and m["config_hash"] and m["uuid"]
    with pytest.raises(ArtifactError, match="expected a 'pool'"):
        read_manifest(d, kind="pool")


def test_pool_round_trip(tiny_pool):
    assert tiny_pool.n_sequences == 40 and tiny_pool.seq_len == 32 and tiny_pool.n_shards == 2
    assert set(tiny_pool.source_names) <= {"clean", "spam"}
    assert len(tiny_pool.ids(0)) == 16 and len(tiny_pool.ids("val")) == 8
    b = tiny_pool.batch([0, 3])
    assert b.dtype == torch.long and b.shape == (2, 32)
    assert tiny_pool.load_tokenizer().decode(b[0].tolist()) == tiny_pool.decode(0)


@pytest.mark.parametrize("name", ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-2.8b"])
def test_pythia_presets_match_published_size(name):
    from transformers import AutoModelForCausalLM

    from lmselect.models.presets import PRESETS, count_params, hf_config

    p = PRESETS[name]
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config(name, p.published_vocab))
    assert type(m).__name__ == "GPTNeoXForCausalLM"
    assert count_params(m) == p.published_params
    assert m.config.use_parallel_residual and not m.config.tie_word_embeddings


def test_llama_preset_is_about_half_a_billion():
    from transformers import AutoModelForCausalLM

    from lmselect.models.presets import count_params, hf_config

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(hf_config("llama-0.5b", 32000))
    assert type(m).__name__ == "LlamaForCausalLM"
    assert 0.45e9 < count_params(m) < 0.6e9


def test_build_model_is_seeded_and_from_scratch():
    from lmselect.models import build_model

    a, b = build_model("debug", 300, seed=1), build_model("debug", 300, seed=1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
        if n.endswith("bias"):
            assert torch.count_nonzero(pa) == 0, n
    w = a.get_input_embeddings().weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.003


def test_topk_matches_bruteforce_sort():
    from lmselect.select.topk import gumbel_topk, top_fraction

    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)
    scores = rng.integers(0, 50, size=1000).astype(float)  # many ties
    got = top_fraction(ids, scores, 0.2)
    brute = sorted(sorted(zip(ids, scores), key=lambda t: (-t[1], t[0]))[:200])
    assert got.tolist() == [int(i) for i, _ in brute]
    assert np.array_equal(gumbel_topk(ids, scores, 0.2, 0.5, seed=3), gumbel_topk(ids, scores, 0.2, 0.5, seed=3))
    distinct = rng.permutation(1000).astype(float)
    assert np.array_equal(gumbel_topk(ids, distinct, 0.2, 1e-9, seed=3), top_fraction(ids, distinct, 0.2))
    assert np.array_equal(gumbel_topk(ids, distinct, 0.2, 1e-9, seed=3, largest=False), top_fraction(ids, distinct, 0.2, largest=False))
    assert not np.array_equal(gumbel_topk(ids, distinct, 0.2, 1e3, seed=3), top_fraction(ids, distinct, 0.2))
