"""What the deepspeed-launcher tests (test_launcher_one_node.py, test_multinode.py) share: the
training command, the launcher's environment, and the uninterrupted reference run.

The reference for every loss curve is an uninterrupted 2-rank run of the same launcher on one
node (dp=2 in every run compared with it, same gloo all-reduce between the two ranks, so the
curves are equal bit for bit; 1e-6 leaves room for nothing but float printing)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from conftest_data import demo_run_sets

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
STEPS = 40
STEP_SLEEP = "0.25"  # slows the signalled runs down so that the SIGTERM lands mid-run
TRAIN_SETS = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.rotary_pct=1.0",
              "data.seq_length=32", "train.micro_batch_size=2", "train.log_every=1",
              "train.progress_bar=false", "optim.warmup_steps=3", "train.eval_batches=2",
              "train.threads=1", f"train.steps={STEPS}"]
_CACHE = {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sets(run_dir, data, *extra):
    return demo_run_sets(TRAIN_SETS, run_dir, data, *extra)


def train_cmd(launcher_args, run_dir, data, *extra):
    return ([os.path.join(BIN, "deepspeed"), *launcher_args, "--module", "megaponder", "train",
             "--config", "examples/configs/tiny.yml", *train_sets(run_dir, data, *extra)])


def launcher_env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_steps(run_dir):
    try:
        return len(losses(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for_steps(proc, run_dir, n, log, timeout=180):
    deadline = time.time() + timeout
    while logged_steps(run_dir) < n:
        assert proc.poll() is None, f"the run ended before step {n}:\n{open(log).read()[-3000:]}"
        assert time.time() < deadline, f"no step {n} after {timeout} s:\n{open(log).read()[-3000:]}"
        time.sleep(0.05)


def latest_step(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return int(f.read().strip().removeprefix("global_step"))


def assert_saved_by_both_ranks(run_dir, step):
    from megaponder.train import checkpoint as ckpt
    folder = os.path.join(run_dir, "checkpoints", f"global_step{step}")
    assert ckpt.verify_checkpoint(folder, rank=0, world_size=2) is None, os.listdir(folder)
    assert sorted(os.listdir(os.path.join(folder, "rng"))) == ["rank0.pt", "rank1.pt"]


def assert_same_curve(reference, got):
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    worst = max(abs(reference[s] - got[s]) for s in reference)
    assert worst <= 1e-6, (worst, [(s, reference[s], got[s]) for s in reference if reference[s] != got[s]][:5])


def demo_data() -> str:
    from conftest_data import demo_corpus_dir  # built once per test session
    return demo_corpus_dir()


def reference_losses() -> dict:
    """Uninterrupted: the deepspeed launcher, one node, 2 ranks (run once per session)."""
    if "reference" not in _CACHE:
        run_dir = os.path.join(tempfile.mkdtemp(prefix="reference-"), "run")
        proc = subprocess.run(train_cmd(["--num_gpus", "2", "--master_port", str(free_port())], run_dir,
                                        demo_data()),
                              cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
        _CACHE["reference"] = losses(run_dir)
    return _CACHE["reference"]


def running(pid):
    """Alive and not a zombie (a dead process waits for the machine's init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def processes_with(text):
    """PIDs whose command line contains ``text`` (this machine, every PID namespace it sees)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def group_members(pgid):
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid and running(int(pid)):
                members.append(int(pid))
        except OSError:
            pass
    return members
