"""Recipe validation before any compute (issue 21, item 3): context lengths of every model against the sequence
lengths it will see. Regression: a copy of demo.yaml on a pool prepared with ``--seq-len 1024`` (proxy preset
``debug``, 512 positions) failed only after the target warm-up had trained."""

from __future__ import annotations

import shutil

import pytest

from lmselect.cli import main
from lmselect.config import ConfigError
from lmselect.paths import RECIPES_DIR
from lmselect.recipe import load_recipe
from lmselect.testing import make_pool


@pytest.fixture(scope="module")
def long_pool(tmp_path_factory, tiny_tokenizer):
    """A real (tiny) pool of 1024-token sequences, as the README's own-corpus example prepares."""
    return make_pool(tmp_path_factory.mktemp("ctx") / "pool", tiny_tokenizer, n_per_shard=2, n_shards=3, n_val=1,
                     seq_len=1024)


def _copy_demo(tmp_path, pool) -> str:
    my = tmp_path / "my.yaml"
    shutil.copy(RECIPES_DIR / "demo.yaml", my)
    text = my.read_text().replace("pool:\n  prepare:", f"pool:\n  path: {pool}\n  prepare:", 1)
    my.write_text(text)
    return str(my)


def test_copied_demo_recipe_on_a_1024_token_pool_is_refused_at_load(tmp_path, long_pool, capsys):
    my = _copy_demo(tmp_path, long_pool)
    with pytest.raises(ConfigError) as e:
        load_recipe(my)
    msg = str(e.value)
    assert msg.startswith("recipe key 'proxy.preset'") and "'debug' holds 512 tokens" in msg and "1024" in msg
    # the CLI: one line, before anything is written
    assert main(["run", my, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "proxy.preset" in err and not (tmp_path / "run").exists()
    # with presets that hold 1024 tokens the same recipe loads
    r = load_recipe(my, ["--proxy.preset=pythia-14m", "--target.preset=pythia-31m"])
    assert r.pool.path == str(long_pool)


def test_other_lengths_and_method_models_are_checked(tmp_path, long_pool):
    demo = str(RECIPES_DIR / "demo.yaml")
    with pytest.raises(ConfigError, match=r"^recipe key 'validation\.seq_len' \(from the command line"):
        load_recipe(demo, ["--validation.seq_len=600"])
    with pytest.raises(ConfigError, match=r"^recipe key 'proxy\.preset'.*pool\.prepare\.seq_len is 1024"):
        load_recipe(demo, ["--pool.prepare.seq_len=1024"])
    with pytest.raises(ConfigError, match=r"^recipe key 'rho1\.seq_len'"):
        load_recipe(demo, ["--methods=random,rho1", "--rho1.seq_len=4096"])
    with pytest.raises(ConfigError, match=r"^recipe key 'mates\.influence_preset'.*unknown model preset"):
        load_recipe(demo, ["--methods=random,mates", "--mates.influence_init=preset",
                           "--mates.influence_preset=nope"])
