"""``PrepareTask``: one prepare task as a datatrove ``PipelineStep`` (datatrove imported here, only when tasks run
under its executor; see :mod:`lmselect.data.prepare_tasks`)."""

from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from lmselect.artifacts import LmselectError
from lmselect.data.prepare_tasks import run_task


class PrepareTask(PipelineStep):
    """Builds part ``rank`` of a prepare plan (``prepare_tasks.run_task``); its counts go to datatrove's per-task
    stats. A bad input is a one-line LmselectError: written to ``WORK/errors/RANK.txt`` for the launching process to
    show as its one line, and not raised (datatrove would log it with a traceback). datatrove then marks the rank
    complete, but the part's own marker (``part.json``) is what counts: the launcher removes datatrove's marker of a
    rank whose part is missing before every run."""

    name = "lmselect prepare"
    type = "🔢 - TOKENIZE"

    def __init__(self, work: str, cfg: object, threads: int = 1):
        super().__init__()
        self.work = work
        self.cfg = cfg  # the PrepareConfig (pickled with the step: this module does not import prepare)
        self.threads = threads

    def run(self, data: object = None, rank: int = 0, world_size: int = 1) -> None:
        try:
            with self.track_time():
                info = run_task(Path(self.work), rank, self.cfg, threads=self.threads)
        except LmselectError as e:
            errors = Path(self.work) / "errors"
            errors.mkdir(exist_ok=True)
            (errors / f"{rank:05d}.txt").write_text(f"{e}\n")
            self.stat_update("failed")
            return None
        self.stat_update("documents", value=info["documents"])
        self.stat_update("tokens", value=info["tokens"])
        self.stat_update("records", value=info["read"]["records"])
        return None
