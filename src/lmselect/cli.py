"""``lmselect`` command line: one verb per pipeline stage.

Each verb lives in its own module, which defines::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int | None: ...

Modules are imported lazily so ``lmselect --help`` stays fast. Errors derived from ``LmselectError`` (and config
errors) are printed as one line, ``lmselect: error: ...``, with exit code 2; so is, as a last resort, an ``OSError``
that names a file (a full or read-only disk no stage caught). ``--debug`` shows the traceback.

SIGTERM (what Slurm sends at a time limit or on preemption, and what torchrun sends the other ranks when one fails)
stops a verb the way Ctrl-C does: it is raised as :class:`Terminated`, a ``KeyboardInterrupt``, so every ``finally``
(the run lock, progress checkpoints, the process group) runs, and the verb ends with one line and exit code 143;
rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any, Sequence

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("lmselect.data.prepare", "tokenize and pack a corpus into a sharded token pool"),
    "train": ("lmselect.train.cli", "pretrain a model preset on a pool, shard or selection"),
    "score": ("lmselect.score.cli", "score every sequence of a pool (or a .jsonl file) with a score model"),
    "select": ("lmselect.select.cli", "pick the top fraction (or Gumbel-top-k) of scored sequences"),
    "run": ("lmselect.pipeline", "run a multi-round data-selection recipe (resumable)"),
    "demo": ("lmselect.pipeline_demo", "run the bundled demo recipe end to end"),
    "compare": ("lmselect.compare", "run several methods on one recipe and seeds, tabulate and plot"),
    "eval": ("lmselect.eval.cli", "zero-shot downstream evaluation with lm-evaluation-harness"),
    "report": ("lmselect.report.cli", "write report.html and figures for a run directory"),
    "inspect": ("lmselect.inspect", "summarise a pool or run directory: manifest, samples, lineage"),
    "check": ("lmselect.check", "known-answer check: does a method pick planted target-like data and drop junk?"),
    "export": ("lmselect.export", "write a selection's documents (jsonl/parquet) and flat tokens for other trainers"),
    "slurm": ("lmselect.slurm", "write (and --submit) an sbatch script running run/train/score/compare on N nodes"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM received: unwind like Ctrl-C (a ``KeyboardInterrupt``), so cleanup code needs no second path."""


def _raise_terminated(signum: int, frame: Any) -> None:
    # a second SIGTERM (torchrun and srun may both send one) must not interrupt the cleanup the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


MMAP_THRESHOLD = 1 << 20  # glibc: blocks from this size up come from (and go back to) the OS, see pin_mmap_threshold


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold for this process (``mallopt(M_MMAP_THRESHOLD)``, what the
    ``MALLOC_MMAP_THRESHOLD_`` variable sets); False where there is no glibc.

    Why: by default glibc raises the threshold to the size of every large block freed (up to 32 MiB), so after the
    first batch a model's per-batch activations of a few MiB come from the heap instead, fragment it, and the
    process's peak resident set creeps up batch after batch: ``score`` of 3,000 pool sequences in batches of 16 went
    1.34 -> 1.47 GB over 190 batches and kept going (25M -> 125M-token pools: +43 %); pinned, 1.29 GB flat. Blocks
    from mmap go back to the OS when freed."""
    import ctypes

    try:  # the symbols already loaded into this process (libc among them): no library search at start-up
        return bool(ctypes.CDLL(None).mallopt(-3, int(nbytes)))  # -3: M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):  # no mallopt (macOS): its allocator does not do this
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmselect",
        description="Choose which data a language model is pretrained on (BLISS, BLADE, RHO-1, MATES, random).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, (_, help_) in COMMANDS.items():
        sub.add_parser(verb, help=help_, add_help=False)
    return parser


def _version() -> str:
    from lmselect import __version__  # start-up: the package's __init__ only when --version asks

    return __version__


def verb_parser_and_module(verb: str) -> tuple[argparse.ArgumentParser, object]:
    mod_name, help_ = COMMANDS[verb]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmselect"):
            raise SystemExit(f"lmselect: error: the '{verb}' command is not available in this build ({e.name})") from None
        raise
    p = argparse.ArgumentParser(prog=f"lmselect {verb}", description=(mod.__doc__ or help_).strip().split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    mod.add_arguments(p)
    return p, mod


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The full parser of one verb (what ``lmselect VERB --help`` prints); the documentation's CLI reference is
    generated from it, so it cannot drift from the code."""
    return verb_parser_and_module(verb)[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        # Output to a file or pipe: no tqdm bars from the libraries underneath (lm-eval, datasets), whose \r frames
        # clutter logs; lmselect's own progress prints periodic log lines there (lmselect.log.Progress).
        os.environ.setdefault("TQDM_DISABLE", "1")
    top = build_parser()
    # find the verb: first non-option argument
    verb_idx = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb_idx is None or argv[verb_idx] not in COMMANDS:
        if verb_idx is not None:
            top.error(f"unknown command '{argv[verb_idx]}' (choose from {', '.join(COMMANDS)})")
        top.parse_args(argv)
        top.print_help()
        return 0
    debug = "--debug" in argv[:verb_idx]
    verb = argv[verb_idx]
    parser, mod = verb_parser_and_module(verb)
    args, rest = parser.parse_known_args(argv[verb_idx + 1 :])
    # --key.sub=value overrides pass through to config loading; anything else unknown is an error
    bad = [a for a in rest if not (a.startswith("--") and ("." in a.split("=")[0] or "=" in a))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    debug = debug or getattr(args, "debug", False) or os.environ.get("LMSELECT_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not debug:
        _quiet_third_party()
    # start-up: `lmselect --help` imports the standard library only (artifacts pulls numpy and yaml)
    from lmselect.artifacts import LmselectError
    from lmselect.config import ConfigError

    if getattr(args, "take_over_lock", False):
        from lmselect.runlock import TAKE_OVER_ENV  # start-up, as above

        os.environ[TAKE_OVER_ENV] = "1"
    prev_term = _install_sigterm()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # a user's own setting wins
        pin_mmap_threshold()
    try:
        rc = mod.run(args)  # type: ignore[attr-defined]
    except Terminated:
        where = _rank_prefix()
        print(f"lmselect {verb}: {where}stopped by SIGTERM (time limit, preemption or a failed rank); rerun the same "
              "command to resume", file=sys.stderr)
        return 143
    except (LmselectError, ConfigError) as e:
        if debug:
            raise
        print(f"lmselect {verb}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # a collective failed because another rank or node went away (killed, out of memory, node failure):
        # say which rank saw it; the failed rank's own line (or torchrun's summary) names the cause
        if debug or not _is_peer_failure(e):
            raise
        first = _peer_error_text(e)
        print(f"lmselect {verb}: {_rank_prefix()}error: lost contact with the other ranks ({first}); "
              "another rank or node failed; rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmselect {verb}: {_rank_prefix()}interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        # last resort for filesystem errors that no stage turned into an LmselectError: a file named by the OS
        # (full disk, read-only filesystem, permission denied, ...) is a one-line problem for the user, not a bug
        if debug or e.filename is None:
            raise
        print(f"lmselect {verb}: error: {_one_line(os_error_message(e))}", file=sys.stderr)
        return 2
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    return int(rc or 0)


def _install_sigterm() -> Any:
    """Route SIGTERM to :class:`Terminated`; returns the previous handler (None when not in the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave its signals alone
        return None


def _is_peer_failure(e: BaseException) -> bool:
    """A torch.distributed error of a multi-process run whose cause is a peer that is gone."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return False
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", ())
    text = str(e).lower()
    return isinstance(e, dist_error) or any(k in text for k in (
        "connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl", "socket timeout"))


def _peer_error_text(e: BaseException) -> str:
    """The gist of a collective's error: its first sentence without gloo's ``[file.cc:line]`` prefix."""
    import re

    first = (str(e).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return first.split(". ")[0].rstrip(".")[:160]


def _rank_prefix() -> str:
    """``rank R of W: `` under torchrun, so the line of each rank in a multi-node log says which one it is."""
    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f"rank {os.environ.get('RANK', '?')} of {world}: "
    return ""


def os_error_message(e: OSError) -> str:
    """``FILE: cannot write: no space left on device`` style text for an OSError that names a file."""
    import errno as _errno

    from lmselect.artifacts import WRITE_FAULT_ERRNOS  # start-up, as in main()

    what = (e.strerror or os.strerror(e.errno or _errno.EIO)).lower()
    target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    verb = "cannot write: " if e.errno in WRITE_FAULT_ERRNOS and e.errno not in (_errno.EACCES, _errno.EPERM) else ""
    return f"{target}: {verb}{what}"


def _quiet_third_party() -> None:
    """Keep lmselect's own progress bars and logs readable: the libraries underneath log every task they build and
    draw a bar for every checkpoint they load. ``--debug`` keeps them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' tqdm bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' "Map:" bars (lm-eval task building)
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers" in sys.modules:  # already imported: the env var above came too late for it
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
