"""A new user's first-hour mistakes through the real command line: each is one line on stderr,
exit code 2, no traceback — in one process and, where ranks are involved, under torchrun."""
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir
from dist_utils import free_port

TINY_YML = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")
SMALL = ["model.hidden_size=32", "model.num_layers=1", "data.seq_length=16",
         "train.micro_batch_size=2", "train.eval_batches=1", "train.threads=1",
         "train.progress_bar=false"]


def _sets(run_dir, *extra):
    demo = demo_corpus_dir()
    sets = [f"train.run_dir={run_dir}", f"data.path=[{demo}/train_text_document]",
            f"data.valid_path=[{demo}/validation_text_document]",
            f"data.tokenizer_model={demo}/tokenizer.model", *SMALL, *extra]
    return [a for s in sets for a in ("--set", s)]


def _run(cmd, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=timeout)


def _megaponder(*args):
    return [sys.executable, "-m", "megaponder", *map(str, args)]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "megaponder", *map(str, args)]


def _one_line(proc, start, code=2):
    """The run failed with exactly one 'megaponder: ' line, starting with ``start``, and no
    traceback from megaponder's processes."""
    ours = [line for line in proc.stderr.splitlines() if line.startswith("megaponder: ")
            and not line.startswith("megaponder: note:")]
    assert proc.returncode == code and len(ours) == 1, (proc.returncode, proc.stderr[-3000:])
    assert ours[0].startswith("megaponder: " + start), ours[0]
    # torchrun's own ChildFailedError is the launcher's; none from the ranks
    assert proc.stderr.count("Traceback (most recent call last)") == \
        proc.stderr.count("ChildFailedError:"), proc.stderr[-3000:]
    return ours[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-step vanilla run with a checkpoint (about 15 s)."""
    run_dir = tmp_path_factory.mktemp("first-hour") / "run"
    proc = _run(_megaponder("train", "--config", TINY_YML,
                            *_sets(run_dir, "train.steps=2", "train.save_every=2")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_missing_checkpoint_for_eval_and_generate():
    for cmd in (("eval", "--checkpoint", "/nonexistent", "--data", "x"),
                ("generate", "--checkpoint", "/nonexistent", "--prompt", "In the")):
        _one_line(_run(_megaponder(*cmd)), "'/nonexistent' is neither a megaponder checkpoint")


@pytest.mark.parametrize("yaml_text, sets, expected", [
    ("", ["train.step=3"], "Unknown config key 'train.step'. Did you mean 'train.steps'?"),
    ("train:\n  seed: 1.0e+25\n", [], "train.seed: 1e+25 does not fit a 64-bit integer"),
    ("model:\n  hidden_size: 1.0e+30\n", [], "model.hidden_size: 1e+30 does not fit a 64-bit integer"),
    ("", ["train.seed=5000000000"], "Invalid configuration: train.seed must be between 0 and 2**32-1"),
])
def test_typos_and_overflowing_numbers(tmp_path, yaml_text, sets, expected):
    config = tmp_path / "c.yml"
    config.write_text(open(TINY_YML).read() + "\n" + yaml_text if yaml_text else open(TINY_YML).read())
    if yaml_text:  # the later section wins as a whole; merge by hand instead
        import yaml
        tree = yaml.safe_load(open(TINY_YML))
        for section, values in yaml.safe_load(yaml_text).items():
            tree.setdefault(section, {}).update(values)
        config.write_text(yaml.safe_dump(tree))
    _one_line(_run(_megaponder("train", "--config", config, *[a for s in sets for a in ("--set", s)])),
              expected)


def test_resume_into_a_run_of_another_family_or_shape(tiny_run):
    """Compared with the checkpoint's config.yml before any weight is read: one line, also
    under a 2-process torchrun (one line in all, not one per rank)."""
    expected = (f"cannot resume from {tiny_run}/checkpoints/global_step2: it holds another "
                f"model: model.family=vanilla (config says adaponderlm)")
    proc = _run(_megaponder("train", "--config", os.path.join(REPO_ROOT, "examples", "configs",
                                                             "tiny-adaponderlm.yml"),
                            *_sets(tiny_run, "train.steps=4", "train.resume=true")))
    line = _one_line(proc, expected)
    assert "Missing key" not in proc.stderr and "config.yml" in line
    proc = _run(_torchrun("train", "--config", TINY_YML,
                          *_sets(tiny_run, "train.steps=4", "train.resume=true",
                                 "model.hidden_size=64")))
    _one_line(proc, f"cannot resume from {tiny_run}/checkpoints/global_step2: it holds another "
                    f"model: model.hidden_size=32 (config says 64)", code=1)


def test_corrupt_checkpoint_tokenizer(tiny_run, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "checkpoints" / "global_step2", folder)
    (folder / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff not a model")
    _one_line(_run(_megaponder("generate", "--checkpoint", folder, "--prompt", "In the")),
              f"{folder}/tokenizer.model is not a readable SentencePiece model")


def test_disk_full_during_a_save_names_the_place(tmp_path):
    """A real full file system: a 1 MiB tmpfs (the checkpoint needs ~6 MB) mounted for this
    test. Needs root (mount); skipped otherwise."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        run_dir = mount / "run"
        proc = _run(_megaponder("train", "--config", TINY_YML,
                                *_sets(run_dir, "train.steps=1", "train.save_every=1")))
        line = _one_line(proc, f"disk full at {run_dir}/checkpoints: saving step 1 failed")
        assert "train.resume=auto" in line
        assert not (run_dir / "checkpoints" / "latest").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _wait_for_steps(run_dir, procs, steps, timeout=150):
    import json
    import time
    deadline = time.time() + timeout
    while True:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        if (run_dir / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.endswith("\n")]
            if len(rows) >= steps:
                return
        time.sleep(0.05)


def test_a_killed_rank_is_named_by_the_survivor_in_one_line(tmp_path):
    """Two ranks started as srun starts them (nothing supervising them); rank 1 is SIGKILLed
    mid-run: rank 0 leaves its collective at once (not after parallel.timeout_minutes) with one
    line naming rank 1, exit 4 (a peer's failure, as for a collective timeout)."""
    import time

    from test_cluster_failures import finish, srun_like
    demo = demo_corpus_dir()
    run_dir = tmp_path / "run"
    procs = srun_like([REPO_ROOT, REPO_ROOT], run_dir, "train.steps=400",
                      "parallel.timeout_minutes=5", f"data.path=[{demo}/train_text_document]",
                      f"data.valid_path=[{demo}/validation_text_document]",
                      f"data.tokenizer_model={demo}/tokenizer.model",
                      env={"MEGAPONDER_FAULT_STEP_SLEEP": "0.1"})
    try:
        _wait_for_steps(run_dir, procs, 2)
        procs[1].kill()
        killed = time.time()
        rc, _, err, ended = finish(procs[0], timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    lines = [line for line in err.splitlines() if line.startswith("megaponder: ")]
    assert rc == 4 and lines == [
        "megaponder: rank 0: rank 1 died during a collective (its connection closed); its own "
        "log says why (killed, out of memory, node lost). Resume with --set train.resume=auto "
        "once it is fixed."], err[-3000:]
    print("survivor left after", round(ended - killed, 1), "s")
    assert "Traceback" not in err and ended - killed < 60, err[-3000:]


def _child_with_rank(launcher_pid, rank):
    """The pid of the torchrun worker whose environment says RANK=rank."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in children:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_killed_rank_under_torchrun_is_one_line_not_a_gloo_dump(tmp_path):
    """torchrun, 2 ranks; rank 1 SIGKILLed mid-run. Rank 0 prints one line naming rank 1 (or,
    when torchrun's SIGTERM reaches it first, none): never a traceback; torchrun's summary
    names rank 1 (the root cause) and exits non-zero."""
    import signal
    import time
    demo = demo_corpus_dir()
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
           "MEGAPONDER_FAULT_STEP_SLEEP": "0.1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen(_torchrun("train", "--config", TINY_YML,
                                      *_sets(run_dir, "train.steps=400", "train.log_every=1")),
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run_dir, [proc], 2)
        victim = _child_with_rank(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ours = [line for line in err.splitlines() if line.startswith("megaponder: ")]
    assert proc.returncode != 0 and len(ours) <= 1, err[-3000:]
    if ours:
        assert ours[0].startswith("megaponder: rank 0: rank 1 died during a collective"), ours
    assert "[rank0]: Traceback" not in err and "gloo" not in err.lower(), err[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in err or "exitcode  : -9" in err, err[-3000:]
    print("torchrun exited", round(time.time() - killed, 1), "s after the kill;", ours)
