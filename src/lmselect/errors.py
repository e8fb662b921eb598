"""The one error root of lmselect: every user-facing problem is an :class:`LmselectError`.

The CLI prints such an error on one line (``lmselect VERB: error: ...``) and exits 2; anything else is a bug and
keeps its traceback. Messages name the file, key or record and say what is wrong with it. This module is a leaf
(it imports nothing from lmselect), so config, artifacts and every stage can share the hierarchy without cycles.
"""

from __future__ import annotations


class LmselectError(RuntimeError):
    """A user-facing error: the CLI prints its message on one line and exits non-zero (no traceback)."""


class ConfigError(LmselectError, ValueError):
    """A configuration problem; the message names the offending key and where its value came from (file or command
    line). ``key`` is the dotted key (``optim.lr``, ``inputs[0]``) when the problem is one key's value, else None."""

    def __init__(self, msg: str, key: str | None = None) -> None:
        super().__init__(msg)
        self.key = key


class ArtifactError(LmselectError):
    """An artifact on disk is missing, incomplete, of the wrong kind or inconsistent with its manifest."""


class StaleStageError(LmselectError):
    """A stage on disk was made by another configuration (or from other parents) than the one now asked for."""
