"""``lmselect slurm VERB ...``: write (and optionally submit) an sbatch script that runs a distributed verb on N nodes.

    lmselect slurm run recipes/paper.yaml --out runs/paper --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00
    lmselect slurm train --pool POOL --out ckpt --nodes 2 --gpus-per-node 8 --partition gpu --time 4:00:00 --submit
    lmselect slurm score --model M --pool POOL --out scores --nodes 1 --gpus-per-node 8 --array 16 ...   # 16 array tasks
    lmselect slurm prepare CORPUS/ --out pools/big --seq-len 2048 --array 64 --cpus-per-task 4 --partition cpu \\
        --time 4:00:00 --submit        # 64 prepare tasks (--task i/64), then a merge job (render_prepare)

This is a template, not a scheduler: the script has one Slurm task per node, and each task starts one ``torchrun``
agent (``srun --kill-on-bad-exit=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=G --rdzv-backend=c10d
--rdzv-endpoint=HEAD:PORT --rdzv-id=$SLURM_JOB_ID -m lmselect.cli VERB ...``), as torchtitan's
``multinode_trainer.slurm`` does. The head node is the first of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``;
the rendezvous port is derived from the job id, ``60000 + SLURM_JOB_ID % 5000``, the formula OLMo-core's Slurm
entrypoint uses (allenai/OLMo-core ``src/scripts/lambda/entrypoint.sh``), so two jobs sharing a node do not collide.
Each node writes its own log (``LOG_DIR/lmselect-VERB-JOBID-nodeK.log``). ``--array K`` (score) makes K array tasks,
each scoring ``--shard $SLURM_ARRAY_TASK_ID/K`` (its torchrun ranks split the part further).

Faults: Slurm sends SIGTERM at the time limit and on preemption; srun passes it to torchrun, torchrun to the ranks, and
every lmselect verb stops on it as on Ctrl-C (one line, resumable). With ``--requeue`` (on by default) a preempted or
failed-node job is requeued, possibly onto other nodes; the run lock recognises the same job id and lets the requeued
job take over (:mod:`lmselect.runlock`). The verb's own arguments are checked here, before anything is submitted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lmselect.artifacts import LmselectError, atomic_write_text
from lmselect.cli import verb_parser_and_module
from lmselect.runlock import slurm_job

DISTRIBUTED_VERBS = ("run", "train", "score", "compare")
PORT_BASE, PORT_SPAN = 60000, 5000  # OLMo-core's entrypoint: MASTER_PORT=$((60000 + SLURM_JOB_ID % 5000))


def rdzv_port(job_id: int | str) -> int:
    """The rendezvous port of a Slurm job, the same formula as the script's ``$((60000 + SLURM_JOB_ID % 5000))``."""
    return PORT_BASE + int(job_id) % PORT_SPAN


@dataclass(frozen=True)
class SlurmEnv:
    """What a process learns from Slurm's environment (None / defaults outside Slurm)."""

    job_id: str | None
    array_job_id: str | None
    array_task_id: int | None
    array_task_count: int | None
    nnodes: int
    node_id: int
    nodelist: str | None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> SlurmEnv:
        env = dict(os.environ if env is None else env)

        def num(key: str) -> int | None:
            v = env.get(key, "").strip()
            if not v:
                return None
            if not v.isdigit():
                raise LmselectError(f"${key}={v!r}: expected a number (is this a Slurm job environment?)")
            return int(v)

        return cls(
            job_id=env.get("SLURM_JOB_ID") or None, array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            array_task_id=num("SLURM_ARRAY_TASK_ID"), array_task_count=num("SLURM_ARRAY_TASK_COUNT"),
            nnodes=num("SLURM_NNODES") or num("SLURM_JOB_NUM_NODES") or 1, node_id=num("SLURM_NODEID") or 0,
            nodelist=env.get("SLURM_JOB_NODELIST") or None,
        )

    @property
    def in_slurm(self) -> bool:
        return self.job_id is not None

    @property
    def job_key(self) -> str | None:
        """Stable across a requeue: ``ARRAYJOB_TASK`` for an array task, else the job id (see :mod:`runlock`)."""
        env = {"SLURM_JOB_ID": self.job_id or "", "SLURM_ARRAY_JOB_ID": self.array_job_id or "",
               "SLURM_ARRAY_TASK_ID": "" if self.array_task_id is None else str(self.array_task_id)}
        return slurm_job(env)

    @property
    def port(self) -> int | None:
        return rdzv_port(self.job_id) if self.job_id and self.job_id.isdigit() else None


# ----------------------------------------------------------------------------------------------------------------
# the script


@dataclass
class SlurmSpec:
    """Everything the sbatch script is made from."""

    verb: str
    verb_args: list[str]
    nodes: int
    gpus_per_node: int
    partition: str
    time: str
    account: str | None = None
    job_name: str | None = None
    cpus_per_task: int | None = None
    log_dir: str = "slurm-logs"
    setup: tuple[str, ...] = ()
    array: int | None = None
    requeue: bool = True

    @property
    def cpus(self) -> int:
        """CPUs of each node's task: ``--cpus-per-task``, else one per rank (Slurm's default of one CPU per task
        would put every rank of the node on one CPU)."""
        return self.cpus_per_task or self.gpus_per_node

    @property
    def omp_threads(self) -> int:
        """OMP_NUM_THREADS of each rank: the task's CPUs shared among its ranks."""
        return max(1, self.cpus // max(1, self.gpus_per_node))


_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


def check_spec(spec: SlurmSpec) -> None:
    """One-line errors, before anything is written or submitted."""
    if spec.verb not in DISTRIBUTED_VERBS:
        raise LmselectError(f"lmselect slurm: '{spec.verb}' is not a distributed verb; choose from "
                            f"{', '.join(DISTRIBUTED_VERBS)}")
    if spec.nodes < 1:
        raise LmselectError(f"--nodes {spec.nodes} is invalid: a job needs at least one node")
    if spec.gpus_per_node < 1:
        raise LmselectError(f"--gpus-per-node {spec.gpus_per_node} is invalid: at least one GPU (rank) per node")
    if spec.cpus_per_task is not None and spec.cpus_per_task < spec.gpus_per_node:
        raise LmselectError(f"--cpus-per-task {spec.cpus_per_task} gives the {spec.gpus_per_node} ranks of a node "
                            "less than one CPU each; use at least --gpus-per-node")
    if not spec.partition.strip():
        raise LmselectError("--partition is empty")
    if not _TIME.match(spec.time.strip()):
        raise LmselectError(f"--time {spec.time!r}: use a Slurm time limit like 30, 4:00:00 or 1-12:00:00")
    if spec.array is not None:
        if spec.verb != "score":
            raise LmselectError("--array splits scoring into shards; it works with 'lmselect slurm score' only")
        if spec.array < 1:
            raise LmselectError(f"--array must be >= 1, got {spec.array}")
        if any(a == "--shard" or a.startswith("--shard=") for a in spec.verb_args):
            raise LmselectError("--array sets each task's --shard itself; drop --shard")


def render(spec: SlurmSpec) -> str:
    """The sbatch script text (see the module docstring for its shape)."""
    check_spec(spec)
    name = spec.job_name or f"lmselect-{spec.verb}"
    log_dir = spec.log_dir.rstrip("/") or "."
    d = [f"--job-name={name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={spec.gpus_per_node}",
         f"--partition={spec.partition}", f"--time={spec.time}"]
    if spec.account:
        d.append(f"--account={spec.account}")
    d.append(f"--cpus-per-task={spec.cpus}")
    job = "%A_%a" if spec.array else "%j"
    # the batch script's own lines go to the submit directory (Slurm opens --output before the script runs, so it
    # cannot be in a folder the script creates); each node's log goes to LOG_DIR, which the script creates
    d.append(f"--output={name}-{job}.out")
    if spec.array:
        d.append(f"--array=0-{spec.array - 1}")
    if spec.requeue:
        d += ["--requeue", "--open-mode=append"]  # a requeued job appends to the same logs
    verb_args = list(spec.verb_args)
    shard = ""
    if spec.array:
        shard = f' --shard "${{SLURM_ARRAY_TASK_ID}}/{spec.array}"'
    cmd = shlex.join(["-m", "lmselect.cli", spec.verb, *verb_args]) + shard
    job_ref = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" if spec.array else "${SLURM_JOB_ID}"
    node_log = f"{log_dir}/{name}-{job_ref}-node%n.log"  # srun expands %n to the node's index in the job
    lines = ["#!/bin/bash",
             "# Written by lmselect slurm; submit with: sbatch THIS_FILE",
             f"# lmselect {spec.verb} on {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s)"
             + (f", {spec.array} array tasks" if spec.array else "")]
    lines += [f"#SBATCH {x}" for x in d]
    lines += ["", "set -uo pipefail",
              "# paths are relative to where sbatch was run: the script travels (copy it to a login node, submit there)",
              'cd "${SLURM_SUBMIT_DIR:-.}"']
    lines += ["# environment (--setup)"] + list(spec.setup) if spec.setup else []
    lines += [
        'if ! command -v torchrun >/dev/null 2>&1; then',
        '    echo "lmselect slurm: torchrun is not on PATH on $(hostname); activate the environment that has '
        "lmselect with --setup, e.g. --setup 'source .venv/bin/activate'\" >&2",
        "    exit 2",
        "fi",
        f"# {spec.cpus} CPU(s) per node task (--cpus-per-task) shared by its {spec.gpus_per_node} rank(s)",
        f"export OMP_NUM_THREADS={spec.omp_threads} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
        "export SRUN_CPUS_PER_TASK=\"$SLURM_CPUS_PER_TASK\"  # srun does not inherit sbatch's --cpus-per-task",
        "",
        "# rendezvous on the first node of the allocation, at a port derived from the job id (as OLMo-core does), so",
        "# two jobs that share a node do not collide",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"RDZV_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        f'mkdir -p {shlex.quote(log_dir)}',
        'echo "lmselect slurm: job $SLURM_JOB_ID on $SLURM_NNODES node(s): $SLURM_JOB_NODELIST; '
        f'rendezvous $HEAD_NODE:$RDZV_PORT; logs {log_dir}/{name}-{job_ref}-node*.log"',
        "",
        "# one task per node, each a torchrun agent for its GPUs; a rank that fails takes the whole step down",
        f'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="{node_log}" \\',
        '    torchrun --nnodes="$SLURM_NNODES" --nproc-per-node=' + str(spec.gpus_per_node) + " \\",
        '    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \\',
        f"    {cmd}",
        "rc=$?",
        f'LOGS="{log_dir}/{name}-{job_ref}-node*.log"',
        'if [ "$rc" -ne 0 ] && grep -qs RendezvousTimeoutError $LOGS; then',
        '    echo "lmselect slurm: job $SLURM_JOB_ID: not every node joined the rendezvous at $HEAD_NODE:$RDZV_PORT '
        '(torchrun RendezvousTimeoutError); check that all $SLURM_NNODES nodes reach $HEAD_NODE; see $LOGS" >&2',
        'elif [ "$rc" -ne 0 ]; then',
        f'    echo "lmselect slurm: job $SLURM_JOB_ID: lmselect {spec.verb} ended with exit code $rc; see '
        '$LOGS; resubmitting this script resumes it" >&2',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def render_prepare(spec: SlurmSpec) -> tuple[str, str]:
    """``lmselect slurm prepare``: two scripts, not torchrun (prepare runs on CPUs). The array script runs
    ``lmselect prepare ARGS --task $SLURM_ARRAY_TASK_ID/K`` (one part each; the first task to start trains the
    tokenizer, the others wait for its plan; a requeued task redoes only its own part), the merge script ``lmselect
    prepare ARGS --tasks K`` (runs any task still missing, then writes the pool); ``--submit`` makes the merge wait for
    the array (``--dependency=afterok``)."""
    if not spec.array or spec.array < 1:
        raise LmselectError("lmselect slurm prepare needs --array K: K array tasks each prepare part I of K, then a "
                            "merge job writes the pool")
    if any(a == "--task" or a.startswith(("--task=", "--tasks")) for a in spec.verb_args):
        raise LmselectError("--array sets each task's --task and the merge's --tasks itself; drop --task/--tasks")
    if not spec.partition.strip():
        raise LmselectError("--partition is empty")
    if not _TIME.match(spec.time.strip()):
        raise LmselectError(f"--time {spec.time!r}: use a Slurm time limit like 30, 4:00:00 or 1-12:00:00")
    name = spec.job_name or "lmselect-prepare"
    log_dir = spec.log_dir.rstrip("/") or "."

    def script(array: bool) -> str:
        d = [f"--job-name={name}" + ("" if array else "-merge"), "--nodes=1", "--ntasks=1",
             f"--partition={spec.partition}", f"--time={spec.time}"]
        if spec.account:
            d.append(f"--account={spec.account}")
        if spec.cpus_per_task:
            d.append(f"--cpus-per-task={spec.cpus_per_task}")
        # in the submit directory: Slurm opens --output before the script runs, so not in the folder it creates
        d.append(f"--output={name}-{'%A_%a' if array else 'merge-%j'}.out")
        if array:
            d.append(f"--array=0-{spec.array - 1}")
        if spec.requeue:
            d += ["--requeue", "--open-mode=append"]
        tail = f' --task "${{SLURM_ARRAY_TASK_ID}}/{spec.array}"' if array else f" --tasks {spec.array}"
        job_ref = "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" if array else "merge-${SLURM_JOB_ID}"
        cmd = shlex.join(["python", "-m", "lmselect.cli", "prepare", *spec.verb_args]) + tail
        lines = ["#!/bin/bash", "# Written by lmselect slurm; submit with: lmselect slurm prepare ... --submit",
                 f"# lmselect prepare: {'part $SLURM_ARRAY_TASK_ID of' if array else 'merge of'} {spec.array} tasks"]
        lines += [f"#SBATCH {x}" for x in d]
        lines += ["", "set -uo pipefail",
                  "# paths are relative to where sbatch was run: the script travels (copy it to a login node, "
                  "submit there)",
                  'cd "${SLURM_SUBMIT_DIR:-.}"']
        lines += ["# environment (--setup)"] + list(spec.setup) if spec.setup else []
        lines += ['if ! python -c "import lmselect" >/dev/null 2>&1; then',
                  '    echo "lmselect slurm: no python with lmselect on PATH on $(hostname); activate the environment '
                  "that has lmselect with --setup, e.g. --setup 'source .venv/bin/activate'\" >&2",
                  "    exit 2",
                  "fi"]
        if spec.cpus_per_task:
            lines.append('export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun does not inherit --cpus-per-task')
        lines += ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}",
                  f"mkdir -p {shlex.quote(log_dir)}",
                  f'srun --kill-on-bad-exit=1 --output="{log_dir}/{name}-{job_ref}.log" {cmd}', "rc=$?",
                  'if [ "$rc" -ne 0 ]; then',
                  f'    echo "lmselect slurm: lmselect prepare ({"task $SLURM_ARRAY_TASK_ID" if array else "merge"}) '
                  f'ended with exit code $rc; see {log_dir}/{name}-{job_ref}.log; resubmitting resumes it (complete '
                  'parts are kept)" >&2',
                  "fi", 'exit "$rc"', ""]
        return "\n".join(lines)

    return script(True), script(False)


def _submit_prepare(sbatch: str, array_script: Path, merge_script: Path) -> str:
    """Submit the array, then the merge with ``--dependency=afterok:ARRAY``; returns sbatch's last line."""
    r = subprocess.run([sbatch, str(array_script)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise LmselectError(f"sbatch {array_script} failed (exit {r.returncode}): {first}")
    ids = re.findall(r"\d+", r.stdout)
    if not ids:
        raise LmselectError(f"sbatch {array_script}: no job id in its answer {r.stdout.strip()!r}")
    r2 = subprocess.run([sbatch, f"--dependency=afterok:{ids[-1]}", str(merge_script)], capture_output=True,
                        text=True, check=False)
    if r2.returncode != 0:
        first = (r2.stderr.strip().splitlines() or ["no message"])[-1]
        raise LmselectError(f"sbatch {merge_script} failed (exit {r2.returncode}); the array job {ids[-1]} runs: "
                            f"merge later with lmselect prepare ... --tasks N ({first})")
    return f"{r.stdout.strip()}\n{r2.stdout.strip()} (merge, after {ids[-1]})"


def _run_prepare(args: argparse.Namespace, verb_args: list[str]) -> int:
    missing = [f"--{k.replace('_', '-')}" for k in ("partition", "time") if getattr(args, k) in (None, "")]
    if missing:
        raise LmselectError(f"missing {', '.join(missing)}")
    spec = SlurmSpec(
        verb="prepare", verb_args=verb_args, nodes=1, gpus_per_node=0, partition=args.partition, time=args.time,
        account=args.account, job_name=args.job_name, cpus_per_task=args.cpus_per_task,
        log_dir=args.log_dir or "slurm-logs", setup=tuple(args.setup or ()), array=args.array,
        requeue=not args.no_requeue,
    )
    array_text, merge_text = render_prepare(spec)
    script = Path(args.script or "lmselect-prepare.sbatch")
    merge = script.with_name(script.stem + "-merge" + script.suffix)
    for path, text in ((script, array_text), (merge, merge_text)):
        atomic_write_text(path, text)
        path.chmod(0o755)
    if not spec.setup:
        print("lmselect slurm: no --setup: the jobs use whatever python is on PATH on the compute nodes; pass "
              "--setup 'source PATH/TO/venv/bin/activate' (or 'module load ...') to choose the environment",
              file=sys.stderr)
    if not args.submit:
        print(f"slurm scripts: {script} (array of {spec.array}), {merge} (merge); submit with: "
              f"jid=$(sbatch --parsable {shlex.quote(str(script))}) && sbatch --dependency=afterok:$jid "
              f"{shlex.quote(str(merge))}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(f"lmselect slurm: sbatch not found on this machine; wrote {script} and {merge}: copy them to a Slurm "
              "login node and submit them there (the merge after the array)", file=sys.stderr)
        return 2
    print(_submit_prepare(sbatch, script, merge))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _slurm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm")
    g.add_argument("--nodes", type=int, help="number of nodes (one torchrun agent each)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node = processes per node")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", help="time limit, e.g. 4:00:00 or 1-00:00:00")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--job-name", help="job name (default lmselect-VERB)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per node task")
    g.add_argument("--array", type=int, help="score: K array tasks, task i scores --shard i/K; prepare: K array "
                   "tasks, task i prepares --task i/K, then a merge job")
    g.add_argument("--log-dir", help="where the per-node logs go (default slurm-logs/)")
    g.add_argument("--setup", action="append", help="a shell line run before launch, e.g. 'source .venv/bin/activate'")
    g.add_argument("--no-requeue", action="store_true", help="do not let Slurm requeue the job after preemption")
    g.add_argument("--script", help="where to write the script (default lmselect-VERB.sbatch)")
    g.add_argument("--submit", action="store_true", help="submit with sbatch (prints the script if there is none)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``lmselect slurm VERB [verb arguments and slurm options]``."""
    _slurm_options(p)
    p.add_argument("verb", help=f"the verb to launch: {', '.join(DISTRIBUTED_VERBS)}, or prepare (an array + a merge)")
    p.add_argument("verb_args", nargs=argparse.REMAINDER, help="the verb's own arguments")


def split_args(verb_args: list[str], args: argparse.Namespace) -> list[str]:
    """Take the slurm options out of ``verb_args`` (they may follow the verb) into ``args``; the rest is the verb's."""
    p = argparse.ArgumentParser(add_help=False)
    _slurm_options(p)
    ours, rest = p.parse_known_args(verb_args)
    for k, v in vars(ours).items():
        if v is not None and v is not False:  # not `v not in (None, False)`: 0 == False, and --nodes 0 is a value
            setattr(args, k, v)
    return rest


def check_verb_args(verb: str, verb_args: list[str]) -> None:
    """Parse the verb's arguments with the verb's own parser and run the verb's own ``preflight`` (the checks it
    makes before any compute: the recipe file and its overrides for run / compare, the config, model and inputs for
    train / score), so a typo, a missing file or ``--rounds=abc`` fails here, not after the queue wait."""
    parser, mod = verb_parser_and_module(verb)
    try:
        ns, rest = parser.parse_known_args(verb_args)
    except SystemExit as e:  # argparse printed the verb's --help (code 0) or its usage error
        if not e.code:
            raise
        raise LmselectError(f"lmselect {verb}: the arguments above do not parse; nothing was written") from None
    bad = [a for a in rest if not (a.startswith("--") and ("." in a.split("=")[0] or "=" in a))]
    if bad:
        raise LmselectError(f"lmselect {verb}: unrecognized arguments: {' '.join(bad)}")
    ns.overrides = rest
    preflight = getattr(mod, "preflight", None)
    if preflight is not None:
        try:
            preflight(ns)
        except LmselectError as e:
            raise type(e)(f"lmselect {verb}: {e}; nothing was written") from None


def run(args: argparse.Namespace) -> int:
    """Write the script (and submit it with ``--submit``)."""
    verb_args = split_args(list(args.verb_args or []), args) + list(getattr(args, "overrides", []) or [])
    if args.verb == "prepare":  # CPU work: an array of prepare tasks and a merge, no torchrun
        check_verb_args(args.verb, verb_args)
        return _run_prepare(args, verb_args)
    if args.verb not in DISTRIBUTED_VERBS:
        raise LmselectError(f"'{args.verb}' is not a distributed verb; choose from {', '.join(DISTRIBUTED_VERBS)}")
    check_verb_args(args.verb, verb_args)  # first: a typo (or --help) concerns the verb, whatever else is missing
    missing = [f"--{k.replace('_', '-')}" for k in ("nodes", "gpus_per_node", "partition", "time")
               if getattr(args, k) in (None, "")]
    if missing:
        raise LmselectError(f"missing {', '.join(missing)}")
    spec = SlurmSpec(
        verb=args.verb, verb_args=verb_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        partition=args.partition, time=args.time, account=args.account, job_name=args.job_name,
        cpus_per_task=args.cpus_per_task, log_dir=args.log_dir or "slurm-logs", setup=tuple(args.setup or ()),
        array=args.array, requeue=not args.no_requeue,
    )
    check_spec(spec)
    text = render(spec)
    script = Path(args.script or f"lmselect-{spec.verb}.sbatch")
    atomic_write_text(script, text)
    script.chmod(0o755)
    if not spec.setup:
        print("lmselect slurm: no --setup: the job uses whatever torchrun is on PATH on the compute nodes; pass "
              "--setup 'source PATH/TO/venv/bin/activate' (or 'module load ...') to choose the environment",
              file=sys.stderr)
    if not args.submit:
        print(f"slurm script: {script}; submit with: sbatch {shlex.quote(str(script))} (from this directory: "
              "paths are relative to it)")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(text)
        print(f"lmselect slurm: sbatch not found on this machine; wrote {script} (printed above): copy it to a "
              "Slurm login node and run sbatch there", file=sys.stderr)
        return 2
    r = subprocess.run([sbatch, str(script)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise LmselectError(f"sbatch {script} failed (exit {r.returncode}): {first}")
    print(r.stdout.strip() or f"submitted {script}")
    return 0
