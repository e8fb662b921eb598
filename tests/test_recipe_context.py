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


def test_mates_influence_model_is_checked_through_the_method_hook(tmp_path):
    """The MATES check is the method's ``model_contexts`` hook: the same messages recipe.py wrote when it branched
    on the name, and nothing for a method that is not in ``methods``."""
    from lmselect.models.presets import get_preset
    from lmselect.select.base import method_class

    demo = str(RECIPES_DIR / "demo.yaml")
    bad = ["--methods=random,mates", "--mates.influence_init=preset", "--mates.influence_preset=nope"]
    with pytest.raises(ConfigError) as e:
        load_recipe(demo, bad)
    try:
        get_preset("nope")
    except Exception as preset_error:
        reason = str(preset_error)
    assert str(e.value) == ("recipe key 'mates.influence_preset' (from the command line: "
                            "--mates.influence_preset=nope): " + reason)
    assert e.value.key == "mates.influence_preset"
    # not in methods: the section is not a model the run builds
    load_recipe(demo, ["--mates.influence_init=preset", "--mates.influence_preset=nope"])
    # a preset that exists but is too short for the pool's sequences: blamed on the influence preset
    with pytest.raises(ConfigError, match=r"^recipe key 'mates\.influence_preset'.*'debug' holds 512 tokens.*1024"):
        load_recipe(demo, ["--methods=random,mates", "--mates.influence_init=preset", "--mates.influence_preset=debug",
                           "--proxy.preset=pythia-14m", "--target.preset=pythia-31m", "--pool.prepare.seq_len=1024"])
    mates = method_class("mates")
    cfg = mates.config_cls(influence_init="target", influence_preset="nope")
    assert mates(cfg).model_contexts() == []  # a copy of the target: checked as the target
    cfg = mates.config_cls(influence_init="preset", influence_preset="debug")
    assert mates(cfg).model_contexts() == [("mates.influence_preset", "MATES influence preset 'debug'",
                                            get_preset("debug").max_position_embeddings)]


def test_recipe_module_names_no_method():
    """Recipe validation reads methods through the registry only: no registered name is a string in recipe.py's code
    (or its key prefix, ``'mates.'``), but for the default ``methods:`` list of the Recipe dataclass."""
    import ast

    import lmselect.recipe
    from lmselect.select.base import method_names

    tree = ast.parse(open(lmselect.recipe.__file__).read())
    defaults = {id(c) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "field"
                for c in ast.walk(n)}
    names = set(method_names())
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and id(n) not in defaults and (n.value in names or n.value.split(".")[0].strip("'") in names)]
    assert not found, found
