"""``lmselect slurm``: the rendered sbatch script (its text, and what it runs under a fake Slurm), Slurm environment
parsing, and the one-line faults (a verb typo, a non-distributed verb, no sbatch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmselect.artifacts import LmselectError
from lmselect.cli import main
from lmselect.slurm import SlurmEnv, SlurmSpec, rdzv_port, render

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _spec(**kw) -> SlurmSpec:
    base = dict(verb="run", verb_args=["demo", "--out", "runs/my run", "--rounds=3"], nodes=2, gpus_per_node=8,
                partition="gpu", time="4:00:00", account="proj", log_dir="logs")
    return SlurmSpec(**{**base, **kw})


def test_rendered_script_text():
    text = render(_spec())
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=4:00:00",
              "--account=proj", "--job-name=lmselect-run", "--requeue"):
        assert f"#SBATCH {d}" in lines, d
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "RDZV_PORT=$((60000 + SLURM_JOB_ID % 5000))" in lines
    assert 'cd "${SLURM_SUBMIT_DIR:-.}"' in lines  # portable: no absolute directory baked in
    flat = text.replace("\\\n", " ")
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in flat
    assert ('torchrun --nnodes="$SLURM_NNODES" --nproc-per-node=8 --rdzv-backend=c10d '
            '--rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"') in " ".join(flat.split())
    assert "-m lmselect.cli run demo --out 'runs/my run' --rounds=3" in flat  # quoted for the shell
    assert '--output="logs/lmselect-run-${SLURM_JOB_ID}-node%n.log"' in flat  # one log per node
    no_account = render(_spec(account=None, requeue=False))
    assert "--account" not in no_account and "--requeue" not in no_account


def _fake_slurm(tmp_path: Path, srun_rc: int = 0) -> dict[str, str]:
    """A PATH with fake scontrol / srun: srun records its argv, one argument per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu03\\ngpu04\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/srun.args\nexit {srun_rc}\n")
    (bin_dir / "torchrun").write_text("#!/bin/bash\nexit 0\n")  # only looked up: srun above is the fake
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234567",
            "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path),
            "SLURM_CPUS_PER_TASK": "8"}


def test_script_runs_the_right_command_under_a_fake_slurm(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(_spec(log_dir=str(tmp_path / "logs"))))
    r = subprocess.run(["bash", str(script)], env=_fake_slurm(tmp_path), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    port = rdzv_port(1234567)
    assert port == 60000 + 1234567 % 5000
    assert args[:3] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1",
                        f"--output={tmp_path}/logs/lmselect-run-1234567-node%n.log"]
    assert args[3:] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=gpu03:{port}", "--rdzv-id=1234567", "-m", "lmselect.cli", "run", "demo",
                        "--out", "runs/my run", "--rounds=3"]
    assert f"rendezvous gpu03:{port}" in r.stdout


def test_script_failure_is_one_line_and_keeps_the_exit_code(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(_spec(log_dir="logs")))
    r = subprocess.run(["bash", str(script)], env=_fake_slurm(tmp_path, srun_rc=3), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        "lmselect slurm: job 1234567: lmselect run ended with exit code 3; see logs/lmselect-run-1234567-node*.log; "
        "resubmitting this script resumes it"]
    # a node that never reached the rendezvous: torchrun's RendezvousTimeoutError in a node log, named in one line
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "lmselect-run-1234567-node1.log").write_text(
        "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n")
    r = subprocess.run(["bash", str(script)], env=_fake_slurm(tmp_path, srun_rc=1), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"lmselect slurm: job 1234567: not every node joined the rendezvous at gpu03:{rdzv_port(1234567)} (torchrun "
        "RendezvousTimeoutError); check that all 2 nodes reach gpu03; see logs/lmselect-run-1234567-node*.log"]


def test_array_scoring_script():
    text = render(_spec(verb="score", verb_args=["--model", "M", "--pool", "P", "--out", "S"], nodes=1, array=16))
    assert "#SBATCH --array=0-15" in text
    assert '-m lmselect.cli score --model M --pool P --out S --shard "${SLURM_ARRAY_TASK_ID}/16"' in text
    assert "lmselect-score-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}-node%n.log" in text
    with pytest.raises(LmselectError, match="score only|'lmselect slurm score'"):
        render(_spec(array=4))
    with pytest.raises(LmselectError, match="drop --shard"):
        render(_spec(verb="score", verb_args=["--shard", "0/2"], array=4))


@pytest.mark.parametrize("kw, msg", [
    ({"verb": "prepare"}, "not a distributed verb"), ({"nodes": 0}, "--nodes"), ({"gpus_per_node": 0}, "--gpus-per-node"),
    ({"time": "four hours"}, "--time"),
])
def test_bad_spec_one_line(kw, msg):
    with pytest.raises(LmselectError, match=msg) as e:
        render(_spec(**kw))
    assert "\n" not in str(e.value)


def test_slurm_env_parsing():
    env = SlurmEnv.from_env({"SLURM_JOB_ID": "777", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
                             "SLURM_JOB_NODELIST": "n[1-4]"})
    assert env.in_slurm and env.nnodes == 4 and env.node_id == 2 and env.nodelist == "n[1-4]"
    assert env.job_key == "777" and env.port == 60777
    arr = SlurmEnv.from_env({"SLURM_JOB_ID": "800", "SLURM_ARRAY_JOB_ID": "790", "SLURM_ARRAY_TASK_ID": "3",
                             "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_JOB_NUM_NODES": "1"})
    assert arr.job_key == "790_3" and arr.array_task_id == 3 and arr.array_task_count == 16 and arr.nnodes == 1
    out = SlurmEnv.from_env({})
    assert not out.in_slurm and out.job_key is None and out.port is None and out.nnodes == 1
    with pytest.raises(LmselectError, match=r"\$SLURM_NNODES='two'"):
        SlurmEnv.from_env({"SLURM_JOB_ID": "1", "SLURM_NNODES": "two"})


def _cli(args, tmp_path, path_extra=None):
    env = {**os.environ, "PYTHONPATH": SRC}
    if path_extra is not None:
        env["PATH"] = f"{path_extra}:{os.environ['PATH']}"
    else:  # no sbatch anywhere on PATH
        env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                      if not (Path(p) / "sbatch").exists())
    return subprocess.run([sys.executable, "-m", "lmselect.cli", "slurm", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_checks_and_submits(tmp_path, capsys, monkeypatch, tiny_pool):
    monkeypatch.chdir(tmp_path)
    common = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00"]
    # slurm options may come before or after the verb; the verb's own arguments are checked by its parser
    assert main(["slurm", "--nodes", "2", "train", "--pool", str(tiny_pool.path), "--out", "ck", "--gpus-per-node",
                 "4", "--partition", "gpu", "--time", "1:00:00", "--steps=10"]) == 0
    text = (tmp_path / "lmselect-train.sbatch").read_text()
    assert f"-m lmselect.cli train --pool {tiny_pool.path} --out ck --steps=10" in text and "--nproc-per-node=4" in text
    assert "mkdir -p slurm-logs" in text  # the script makes its log folder where it runs
    assert main(["slurm", "run", "demo", "--bogus", *common]) == 2
    assert "lmselect slurm: error: lmselect run: unrecognized arguments: --bogus" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    assert main(["slurm", "prepare", "x.jsonl", "--out", "p", *common]) == 2
    assert "lmselect slurm prepare needs --array K" in capsys.readouterr().err
    # prepare's own preflight runs before anything is written: a missing input is one line
    assert main(["slurm", "prepare", "missing.jsonl", "--out", "p", "--array", "2", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.jsonl: input not found" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "lmselect-prepare.sbatch").exists()
    # --submit without sbatch: the script is printed, one line says why, exit 2
    r = _cli(["run", "demo", "--out", "o", *common, "--submit"], tmp_path)
    assert r.returncode == 2 and r.stdout.startswith("#!/bin/bash")
    assert r.stderr.strip().splitlines()[-1].startswith("lmselect slurm: sbatch not found on this machine; wrote ")
    # with an sbatch on PATH, it is run on the script
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/sbatch.args\necho 'Submitted batch job 42'\n")
    (fake / "sbatch").chmod(0o755)
    r = _cli(["run", "demo", "--out", "o", *common, "--submit", "--script", "job.sh"], tmp_path, path_extra=fake)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Submitted batch job 42"
    assert (tmp_path / "sbatch.args").read_text().strip() == "job.sh"


def test_scripts_travel_and_check_everything_before_writing(tmp_path, capsys, monkeypatch, tiny_pool):
    """Regression (issue 29, item 7): the script baked `cd <absolute dir>` and an absolute venv PATH into a file
    meant for a login node; no --cpus-per-task while OMP_NUM_THREADS=8; the --output folder had to exist before the
    job started; a missing recipe, --rounds=abc and score --model nonexist were accepted with rc 0; --nodes 0 said
    "missing --nodes"."""
    monkeypatch.chdir(tmp_path)
    common = ["--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00"]
    assert main(["slurm", "run", "demo", "--out", "o", "--nodes", "2", *common, "--cpus-per-task", "16",
                 "--setup", "source .venv/bin/activate"]) == 0
    text = (tmp_path / "lmselect-run.sbatch").read_text()
    assert str(tmp_path) not in text and sys.prefix not in text and "export PATH" not in text
    assert 'cd "${SLURM_SUBMIT_DIR:-.}"' in text and "source .venv/bin/activate" in text
    assert "#SBATCH --cpus-per-task=16" in text and "export OMP_NUM_THREADS=4 " in text  # 16 CPUs / 4 ranks
    assert "#SBATCH --output=lmselect-run-%j.out" in text  # not inside a folder that may not exist yet
    assert not (tmp_path / "slurm-logs").exists()
    assert main(["slurm", "run", "demo", "--out", "o", "--nodes", "1", *common]) == 0  # default: a CPU per rank
    text = (tmp_path / "lmselect-run.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=4" in text and "export OMP_NUM_THREADS=1 " in text
    capsys.readouterr()
    for argv, msg in [
        (["run", str(tmp_path / "missing.yaml"), "--nodes", "1"], "missing.yaml"),
        (["run", "demo", "--rounds=abc", "--nodes", "1"], "rounds"),
        (["score", "--model", "nonexist", "--pool", str(tiny_pool.path), "--out", "s", "--nodes", "1"],
         "--model nonexist: not found"),
        (["train", "--pool", str(tmp_path / "nopool"), "--out", "ck", "--nodes", "1"], "nopool"),
        (["run", "demo", "--nodes", "0"], "--nodes 0 is invalid"),
        (["run", "demo", "--nodes", "1", "--cpus-per-task", "2"], "less than one CPU each"),
    ]:
        (tmp_path / f"lmselect-{argv[0]}.sbatch").unlink(missing_ok=True)
        assert main(["slurm", *argv, *common]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
        assert not (tmp_path / f"lmselect-{argv[0]}.sbatch").exists(), argv


def test_script_refuses_to_start_without_torchrun(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(_spec(log_dir="logs")))
    env = _fake_slurm(tmp_path)
    (tmp_path / "bin" / "torchrun").unlink()
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "torchrun is not on PATH" in r.stderr and "--setup" in r.stderr
    assert not (tmp_path / "srun.args").exists()


def test_prepare_array_and_merge_under_a_fake_slurm(tmp_path):
    """lmselect slurm prepare --array 3 --submit: a fake sbatch runs the array script once per task (as Slurm would,
    each with its SLURM_ARRAY_TASK_ID) and then the merge script it was told to hold until the array is done; the
    pool equals the one of a single process."""
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from corpus_helpers import clean_records, spam_records, write_jsonl

    from lmselect.artifacts import read_json
    from lmselect.data.prepare import PrepareConfig, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    inputs = [str(write_jsonl(corpus / f"c{i}.jsonl", clean_records(15 + i, f"c{i}"))) for i in range(3)]
    inputs.append(str(write_jsonl(corpus / "spam.jsonl.gz", spam_records(9), "gz")))
    prep = ["--vocab-size", "300", "--seq-len", "16", "--n-shards", "2", "--workers", "1", "--no-progress"]
    ref = prepare(PrepareConfig(inputs=inputs, vocab_size=300, seq_len=16, n_shards=2, workers=1), tmp_path / "ref",
                  progress=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # sbatch: an array script runs once per index; the answer names a job id; the dependency is recorded
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        f"echo \"$@\" >> {tmp_path}/sbatch.log\n"
        "script=${@: -1}\n"
        "arr=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\)$/\\1/p' \"$script\")\n"
        "if [ -n \"$arr\" ]; then for i in $(seq 0 $arr); do SLURM_JOB_ID=$((500+i)) SLURM_ARRAY_JOB_ID=500 "
        "SLURM_ARRAY_TASK_ID=$i bash \"$script\" || exit 1; done; echo 'Submitted batch job 500';\n"
        "else SLURM_JOB_ID=600 bash \"$script\" || exit 1; echo 'Submitted batch job 600'; fi\n")
    # srun: drop its options (--kill-on-bad-exit=1, --output=LOG), run the command
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": SRC, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "lmselect.cli", "slurm", "prepare", *inputs, "--out", "pool", *prep,
                        "--array", "3", "--partition", "cpu", "--time", "1:00:00", "--submit",
                        "--setup", f"export PATH={Path(sys.executable).parent}:$PATH"],  # the environment, as a user would
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls == ["lmselect-prepare.sbatch", "--dependency=afterok:500 lmselect-prepare-merge.sbatch"]
    array = (tmp_path / "lmselect-prepare.sbatch").read_text()
    assert "#SBATCH --array=0-2" in array and '--task "${SLURM_ARRAY_TASK_ID}/3"' in array
    assert "--tasks 3" in (tmp_path / "lmselect-prepare-merge.sbatch").read_text()
    pool = tmp_path / "pool"
    assert read_json(pool / "manifest.json")["extra"]["tasks"] == 3
    for f in ("tokens.bin", "sequences.parquet", "docs.parquet", "tokenizer/tokenizer.json"):
        assert (pool / f).read_bytes() == (ref / f).read_bytes(), f
    assert read_json(pool / "manifest.json")["counts"] == read_json(ref / "manifest.json")["counts"]
