"""Fixtures for report / provenance tests: one synthetic run directory built per session, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fake_run import make_fake_run


@pytest.fixture(scope="session")
def fake_run_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A complete run (5 methods x 2 seeds x 2 rounds). Never modify it: use ``fake_run``."""
    return make_fake_run(tmp_path_factory.mktemp("base") / "RUN", tiny_tokenizer)


@pytest.fixture()
def fake_run(fake_run_base, tmp_path) -> Path:
    """A private copy of the synthetic run that a test may change."""
    dst = tmp_path / "RUN"
    shutil.copytree(fake_run_base, dst)
    return dst


@pytest.fixture(scope="session")
def reported_run(fake_run_base, tmp_path_factory) -> Path:
    """A copy of the synthetic run on which ``write_report`` has run (read-only for tests)."""
    from lmselect.report import write_report

    dst = tmp_path_factory.mktemp("reported") / "RUN"
    shutil.copytree(fake_run_base, dst)
    write_report(dst)
    return dst
