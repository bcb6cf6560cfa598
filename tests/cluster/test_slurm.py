"""examples/slurm/ under a real one-node SLURM (slurm_up.sh): both sbatch scripts, unedited,
with only sbatch command-line overrides for a CPU node; SIGTERM to the batch shell
(``scancel --signal=TERM --batch``, what ``--signal=B:TERM@N`` does) and to the batch
script's whole process group (``--full``) each save at the step reached, requeue the job once,
and the requeued job ends with the uninterrupted job's losses; nothing of a job outlives it.
Node lists are expanded as ``scontrol show hostnames`` does.

The five jobs (one uninterrupted reference, four interrupted ones) run side by side (the test
partition lets jobs share CPUs, ``--oversubscribe``) and are driven by one fixture; the tests
read their outcome. A requeued job waits ~2 min (BeginTime, AuthInfo cred_expire) before it may
start again; the driver releases it with ``scontrol update JobId=N StartTime=now``, but not in
the second of the requeue: slurmd refuses a launch whose credential is no newer (whole
seconds) than the job's revocation ("Job credential revoked", the job ends FAILED)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir

SCRIPTS = os.path.join(REPO_ROOT, "examples", "slurm")
STEPS = 40
STOP_AFTER = 3          # signal once this many steps are logged
STEP_SLEEP = "0.3"      # MEGAPONDER_FAULT_STEP_SLEEP of the interrupted jobs: a 12 s window
CPU_NODE = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--oversubscribe"]
INTERRUPTED = [("train_srun.sbatch", "batch"), ("train_srun.sbatch", "full"),
               ("train.sbatch", "batch"), ("train.sbatch", "full")]
RELEASE_AFTER = 2.0     # s from seeing the requeued job PENDING to releasing it (see above)
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def tiny_config(path, run_dir, demo):
    """examples/configs/tiny.yml, smaller, 40 steps logged each, absolute data paths."""
    cfg = yaml.safe_load(open(os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")))
    cfg["model"].update(hidden_size=64, num_layers=2, num_heads=4)
    cfg["data"].update(path=[f"{demo}/train_text_document"],
                       valid_path=[f"{demo}/validation_text_document"],
                       tokenizer_model=f"{demo}/tokenizer.model", seq_length=32)
    cfg["optim"]["warmup_steps"] = 3
    cfg["train"].update(run_dir=str(run_dir), steps=STEPS, micro_batch_size=4, log_every=1,
                        eval_every=0, eval_batches=2, threads=1)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def job_info(job_id) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                         text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def processes_mentioning(text) -> list[str]:
    """Command lines of live processes that contain ``text`` (a job's unique config path)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid != str(os.getpid()):
            found.append(f"{pid}: {cmd.strip()}")
    return found


def logged_losses(run_dir) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


class Job:
    def __init__(self, root, script, mode):
        self.name = f"{script.split('.')[0]}-{mode or 'whole'}"
        self.script, self.mode = script, mode
        self.dir = root / self.name
        self.dir.mkdir()
        self.run_dir = str(self.dir / "run")
        self.config = tiny_config(self.dir / "config.yml", self.run_dir, demo_corpus_dir())
        self.log = str(self.dir / "job.log")
        self.id = None
        self.signalled = self.requeued = self.released = None
        self.left_between = self.left_after = None
        self.info = {}

    def submit(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        if self.mode:
            env["MEGAPONDER_FAULT_STEP_SLEEP"] = STEP_SLEEP  # test-only: a window to signal in
        if sys.prefix != os.path.join(REPO_ROOT, ".venv"):
            env["PY"] = sys.executable  # the scripts' default is the repo's .venv
        cmd = ["sbatch", "--parsable", *CPU_NODE, f"--chdir={REPO_ROOT}", f"--output={self.log}",
               f"--job-name=mp-{self.name}", os.path.join(SCRIPTS, self.script), self.config]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        self.id = out.stdout.strip().split(";")[0]
        self.submitted = time.time()

    def poll(self) -> bool:
        """One look at the job; signals, releases and records; True once it is over."""
        self.info = job_info(self.id)
        state = self.info.get("JobState")
        if self.mode and self.signalled is None:
            if state == "RUNNING" and len(logged_losses(self.run_dir)) >= STOP_AFTER:
                subprocess.run(["scancel", "--signal=TERM", f"--{self.mode}", self.id], check=True)
                self.signalled = time.time()
            return state in DONE_STATES  # ended before the signal: the test says so
        if self.mode and self.released is None:
            if state == "PENDING" and self.requeued is None:  # requeued, held by BeginTime
                self.requeued = time.time()  # the first run is over
                self.left_between = processes_mentioning(self.config)
            if self.requeued is not None and time.time() >= self.requeued + RELEASE_AFTER:
                subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"], check=True)
                self.released = time.time()
            return state in DONE_STATES
        if state in DONE_STATES:
            self.ended = time.time()
            self.left_after = processes_mentioning(self.config)
            return True
        return False

    def text(self) -> str:
        # newline="": keep the carriage returns a progress bar would write
        return open(self.log, newline="").read() if os.path.exists(self.log) else ""


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Submit the reference and the four interrupted jobs at once and drive them to the end."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    all_jobs = [Job(root, "train_srun.sbatch", None)] + [Job(root, s, m) for s, m in INTERRUPTED]
    start = time.time()
    for job in all_jobs:
        job.submit()
    pending = list(all_jobs)
    try:
        while pending and time.time() - start < 900:
            pending = [job for job in pending if not job.poll()]
            time.sleep(0.5)
    finally:
        for job in pending:  # a hung job must not stay on the machine
            subprocess.run(["scancel", job.id])
    assert not pending, [(j.name, j.info.get("JobState"), j.text()[-2000:]) for j in pending]
    print(f"\nslurm jobs: all done in {time.time() - start:.0f} s; " + ", ".join(
        f"{j.name} {j.ended - j.submitted:.0f} s" for j in all_jobs))
    return {job.name: job for job in all_jobs}


def assert_plain_log(text):
    assert "\r" not in text, "progress-bar redraws in the job log"
    assert f"step {STEPS}/{STEPS} |" in text, text[-2000:]


@pytest.mark.slurm
def test_train_srun_sbatch_trains_unedited_on_a_cpu_node(jobs):
    job = jobs["train_srun-whole"]
    text = job.text()
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", text[-3000:]
    assert job.info["Restarts"] == "0"
    assert sorted(logged_losses(job.run_dir)) == list(range(1, STEPS + 1))
    assert_plain_log(text)
    assert not job.left_after, job.left_after


@pytest.mark.slurm
@pytest.mark.parametrize("script,mode", INTERRUPTED, ids=[f"{s.split('.')[0]}-{m}" for s, m in INTERRUPTED])
def test_sigterm_saves_requeues_once_and_resumes_exactly(jobs, script, mode):
    """Every rank stops after the same step and saves it, exit 0 (no failed srun or launcher);
    the job is requeued once; the requeued run resumes there and ends with the reference
    losses (1e-6); no process of the job is left between the two runs or after them."""
    job, reference = jobs[f"{script.split('.')[0]}-{mode}"], jobs["train_srun-whole"]
    text = job.text()
    assert job.signalled is not None, f"the job ended before step {STOP_AFTER}:\n{text[-3000:]}"
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", text[-3000:]
    assert job.info["Restarts"] == "1" and text.count("[sbatch] requeueing job") == 1, text[-3000:]
    stops = re.findall(r"SIGTERM: stopped after step (\d+) of", text)
    assert len(stops) == 1, text[-3000:]
    step = int(stops[0])
    assert STOP_AFTER <= step < STEPS
    assert f"resumed from {job.run_dir}/checkpoints/global_step{step} at step {step}" in text
    saved = os.path.join(job.run_dir, "checkpoints", f"global_step{step}", "rng")
    assert sorted(os.listdir(saved)) == ["rank0.pt", "rank1.pt"]  # both ranks saved that step
    assert "exited with" not in text and "srun: error" not in text, text[-3000:]
    if script == "train.sbatch":  # DeepSpeed's launch.py saw each rank exit 0, in both runs
        assert text.count("exits successfully") == 4, text[-3000:]
    assert_plain_log(text)
    want, got = logged_losses(reference.run_dir), logged_losses(job.run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6
    assert job.left_between == [] and job.left_after == [], (job.left_between, job.left_after)


@pytest.mark.slurm
def test_make_hostfile_expands_node_lists_as_scontrol(slurm):
    """Multi-bracket, suffix, comma, zero-padded and plain forms: the hostfile lists
    ``scontrol show hostnames`` in its order, and python-hostlist (megaponder's expansion where
    SLURM is absent) gives the same list; a list SLURM refuses is one line, exit 2."""
    from megaponder.parallel.state import expand_nodelist

    forms = ["r[1-2]n[01-02]", "gpu[01-03,07],login1", "nid[0098-0101]", "a-[1-2]b[3,5]",
             "gpu01-ib,gpu02-ib", "n[9-11],m[1-2]x[7-8]", "single"]
    for form in forms:
        want = subprocess.run(["scontrol", "show", "hostnames", form], capture_output=True,
                              text=True, check=True).stdout.split()
        assert expand_nodelist(form) == want, form
        assert expand_nodelist(form, use_scontrol=False) == want, form  # python-hostlist
        out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "make_hostfile.py"),
                              "--nodelist", form, "--slots", "4", "--dry-run", "--",
                              "--module", "megaponder", "train", "--config", "c.yml"],
                             capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        assert lines[1:-1] == [f"{h} slots=4" for h in want], (form, out)
        assert f"--master_addr {want[0]} " in lines[-1] and lines[-1].endswith(
            "--module megaponder train --config c.yml"), lines[-1]
        assert ("--no_ssh_check" in lines[-1]) == (len(want) == 1)
    bad = subprocess.run([sys.executable, os.path.join(SCRIPTS, "make_hostfile.py"),
                          "--nodelist", "node[1-3]-ib", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_sigterm_during_start_up_exits_0_with_one_line(tmp_path):
    """Two ranks started as srun starts them; SIGTERM to rank 0 one second in (still
    importing torch or building the trainer), none to rank 1: both exit 0, rank 0 says once
    that there was nothing to save yet, no step ran, no checkpoint was written."""
    from dist_utils import free_port

    config = tiny_config(tmp_path / "config.yml", tmp_path / "run", demo_corpus_dir())
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(OMP_NUM_THREADS="1", MASTER_PORT=port, SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                   SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost")
        # parallel.timeout_minutes: a rank left alone at the rendezvous fails in 30 s, not 30 min
        procs.append(subprocess.Popen([sys.executable, "-m", "megaponder", "train", "--config", config,
                                       "--set", "train.progress_bar=false",
                                       "--set", "parallel.timeout_minutes=0.5"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        time.sleep(1.0)
        procs[0].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {p.returncode}\n{err[-3000:]}"
    said = [line for line in outs[0][0].splitlines() if "during start-up" in line]
    assert said == ["[megaponder] SIGTERM during start-up: nothing to save yet; continue with the "
                    "same command plus --set train.resume=auto"], outs[0][0][-2000:]
    assert "during start-up" not in outs[1][0]  # rank 0 speaks for the job
    assert not logged_losses(tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "latest")


@pytest.mark.parametrize("script", ["train_srun.sbatch", "train.sbatch"])
def test_scripts_say_in_one_line_where_the_repository_or_its_python_is_missing(tmp_path, script):
    """As sbatch runs it: a copy outside the repository (its spool folder), started in a
    folder that is not the repository: one line naming the fix, exit 2; the same for a PY
    that does not exist."""
    copy = tmp_path / "slurm_script"
    copy.write_text(open(os.path.join(SCRIPTS, script)).read())
    env = {k: v for k, v in os.environ.items() if k not in ("REPO", "PY", "SLURM_SUBMIT_DIR")}
    out = subprocess.run(["bash", str(copy), "c.yml"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "sbatch --chdir=/path/to/megaponder or set REPO=" in out.stderr
    out = subprocess.run(["bash", str(copy), "c.yml"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, SLURM_SUBMIT_DIR=REPO_ROOT, PY=str(tmp_path / "none")), timeout=60)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"{script}: {tmp_path / 'none'} does not exist; run 'make setup' in {REPO_ROOT} or set PY="], out.stderr
