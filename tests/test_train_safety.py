"""Training that survives clusters and untrusted files (megaponder/train/guards.py,
runlock.py, checkpoint.py): safe loading, crash-safe publishing, non-finite losses, SIGTERM /
SIGKILL and resume, the run-dir lock, W&B offline.

The end-to-end runs share one configuration (tiny model, 12 steps, rotary_pct=1 so that the
2-process runs match the single-process one; see test_train.py) and one uninterrupted
reference run, in which step 3's loss is poisoned (MEGAPONDER_FAULT_NAN) so that a skipped step
is part of every curve compared against it."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from conftest_data import demo_run_sets
from test_train import TINY, _free_port, losses

from megaponder.train import checkpoint as ckpt
from megaponder.train.runlock import RunDirBusy, RunDirLock, claim_run_dir

STEPS = 12
COMMON = TINY + ["model.rotary_pct=1.0", f"train.steps={STEPS}", "train.save_every=4"]
NAN_AT_3 = {"MEGAPONDER_FAULT_NAN": "0@3"}  # single process: rank 0 at step 3


def _sets(run_dir, data, extra):
    return demo_run_sets(COMMON, run_dir, data, *extra)


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("MEGAPONDER_FAULT_KILL", None)
    env.update(extra)
    return env


def start(run_dir, data, *extra, nproc=1, env=None):
    """A training job in the background (torchrun for nproc > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_port", str(_free_port())]
    cmd = launcher + ["-m", "megaponder", "train", "--config",
                      os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml"),
                      *_sets(run_dir, data, extra)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(**(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(run_dir, data, *extra, nproc=1, env=None, rc=0):
    proc = start(run_dir, data, *extra, nproc=nproc, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == rc, f"rc {proc.returncode} (expected {rc}):\n{err[-3000:]}"
    return out, err


def logged_lines(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_for_lines(proc, run_dir, n, timeout=120):
    deadline = time.time() + timeout
    while logged_lines(run_dir) < n:
        assert proc.poll() is None, f"the run ended before logging {n} lines: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_curve(a, b, rel=0.0, steps=range(1, STEPS + 1)):
    """1e-6 absolute for the same layout (fp32 on CPU: bit-exact in practice); ``rel`` for
    dp=2 against dp=1 (summation order of the all-reduce only, as in test_train.py)."""
    for s in steps:
        if a[s] != a[s]:  # NaN: the poisoned step 3
            assert b[s] != b[s], (s, b[s])
            continue
        assert abs(a[s] - b[s]) <= 1e-6 + rel * abs(a[s]), (s, a[s], b[s])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_data):
    """The uninterrupted run; also logs to W&B offline and serves as a checkpoint source."""
    pytest.importorskip("wandb")
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    wandb_dir = tmp_path_factory.mktemp("wandb")
    run(run_dir, demo_data, "train.wandb_project=megaponder-test", "train.wandb_run_name=ref",
        env={**NAN_AT_3, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
             "WANDB_SILENT": "true"})
    return run_dir, wandb_dir


def test_reference_skips_the_poisoned_step_and_logs_to_wandb(reference):
    run_dir, wandb_dir = reference
    rows = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[2]["loss"] != rows[2]["loss"] and rows[2]["grad_norm"] != rows[2]["grad_norm"]  # NaN, not null
    assert [r["skipped_steps"] for r in rows] == [0, 0] + [1] * (STEPS - 2)
    # the skipped update left the optimizer state alone: Adam stepped 11 times in 12 steps,
    # while the learning-rate schedule kept following the step number
    state = torch.load(run_dir / "checkpoints" / f"global_step{STEPS}" / "deepspeed" / "state" /
                       "mp_rank_00_model_states.pt", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == STEPS - 1
    assert state["lr_scheduler"]["last_epoch"] == STEPS
    # W&B offline: one run with its history file, named as asked
    runs = [d for d in os.listdir(wandb_dir / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1, os.listdir(wandb_dir / "wandb")
    files = os.listdir(wandb_dir / "wandb" / runs[0])
    assert any(f.endswith(".wandb") for f in files), files
    assert (run_dir / "wandb_id").exists()


def test_sigterm_sigkill_and_resaves_reproduce_the_uninterrupted_losses(tmp_path, demo_data, reference):
    """SIGTERM mid-run saves and exits 0; three SIGKILLs later (two at random moments, one
    inside the re-save of an existing tag, where the old folder is moved aside) and a truncated
    newest checkpoint, the resumed runs still give the reference losses."""
    run_dir, rng = tmp_path / "run", random.Random(0)
    slow = {**NAN_AT_3, "MEGAPONDER_FAULT_STEP_SLEEP": "0.15"}
    proc = start(run_dir, demo_data, env=slow)
    wait_for_lines(proc, run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopped after step" in out and "train.resume=auto" in out
    first_stop = ckpt.tag_step(open(run_dir / "checkpoints" / "latest").read().strip())
    assert 5 <= first_stop < STEPS

    # resume=auto continues; SIGKILL at a random moment of the next steps (saves included)
    proc = start(run_dir, demo_data, "train.resume=auto", env=slow)
    wait_for_lines(proc, run_dir, first_stop + 1)
    with pytest.raises(RunDirBusy, match=f"in use by pid {proc.pid} "):  # a second trainer
        claim_run_dir(str(run_dir), str(run_dir / "checkpoints"), "auto", False)
    time.sleep(rng.uniform(0.0, 0.6))
    proc.kill()
    proc.communicate()

    # the newest checkpoint gets damaged: resume falls back to the previous complete one (with
    # a warning naming the file); SIGKILL that run at a random moment too, then finish
    newest = ckpt.resume_candidates(str(run_dir / "checkpoints"))[0]
    with open(os.path.join(newest, "model.pt"), "r+b") as f:
        f.truncate(100)
    proc = start(run_dir, demo_data, "train.resume=auto", env=slow)
    out = ""
    for line in proc.stdout:
        out += line
        if "resumed from" in line:
            break
    assert "cannot resume from" in out and "model.pt is damaged" in out, out[-2000:]
    time.sleep(rng.uniform(0.2, 0.8))
    proc.kill()
    proc.communicate()
    run(run_dir, demo_data, "train.resume=auto", env=NAN_AT_3)

    # resuming the finished run re-saves its tag: SIGKILL between moving the old one aside and
    # moving the new one in, then resume again
    run(run_dir, demo_data, "train.resume=auto", env={"MEGAPONDER_FAULT_KILL": "aside"}, rc=-9)
    assert not (run_dir / "checkpoints" / f"global_step{STEPS}").exists()
    assert (run_dir / "checkpoints" / f".old-global_step{STEPS}").exists()
    out, _ = run(run_dir, demo_data, "train.resume=auto")
    assert "restored global_step12" in out
    assert_same_curve(losses(reference[0]), losses(run_dir))
    assert open(run_dir / "checkpoints" / "latest").read().strip() == f"global_step{STEPS}"
    assert ckpt.verify_checkpoint(str(run_dir / "checkpoints" / f"global_step{STEPS}")) is None
    assert not [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".")]
    assert records(run_dir)[-2]["skipped_steps"] == 1  # the guard's count survived the resumes


def test_two_process_sigterm_and_non_finite_losses_on_one_rank(tmp_path, demo_data, reference):
    """torchrun, dp=2: SIGTERM to rank 1 alone stops both ranks after the same step (saved,
    exit 0); a NaN loss on rank 1 only is skipped on both ranks and counted; two in a row stop
    the resumed run with exit 3 and `latest` on the last good (finite) checkpoint."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, demo_data, "train.micro_batch_size=2", nproc=2,
                 env={"MEGAPONDER_FAULT_NAN": "1@3", "MEGAPONDER_FAULT_STEP_SLEEP": "0.15"})
    wait_for_lines(proc, run_dir, 5)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    rank1 = [p for p in workers if b"RANK=1\0" in open(f"/proc/{p}/environ", "rb").read()]
    assert len(rank1) == 1, workers
    os.kill(rank1[0], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop request on another rank" in out or "SIGTERM" in out
    stop = ckpt.tag_step(open(run_dir / "checkpoints" / "latest").read().strip())
    assert 5 <= stop < STEPS - 3
    folder = run_dir / "checkpoints" / f"global_step{stop}"
    assert sorted(os.listdir(folder / "rng")) == ["rank0.pt", "rank1.pt"]
    rows = {r["step"]: r for r in records(run_dir) if "loss" in r}
    assert rows[3]["skipped_steps"] == 1 and rows[3]["loss"] != rows[3]["loss"]

    # resume on 2 processes; rank 1 goes non-finite twice in a row two steps later
    bad = f"1@{stop + 2},1@{stop + 3}"
    _, err = run(run_dir, demo_data, "train.micro_batch_size=2", "train.resume=auto",
                 "train.max_skipped_steps=2", nproc=2, env={"MEGAPONDER_FAULT_NAN": bad}, rc=1)
    assert "2 updates in a row were skipped" in err  # torchrun: exit 1 when a worker exits 3
    got = losses(run_dir)
    assert max(got) == stop + 3 and got[stop + 3] != got[stop + 3]
    assert_same_curve(losses(reference[0]), got, rel=1e-5, steps=range(1, stop + 2))
    latest = open(run_dir / "checkpoints" / "latest").read().strip()
    # save_every=4: the last save at or before the first skipped step; none at the stop
    assert ckpt.tag_step(latest) == max(stop, (stop + 2) // 4 * 4)
    import megaponder
    model = megaponder.load_model(str(run_dir))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- untrusted and damaged files (no training) --------------------------------------------
class _Plant:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    torch.save({"module": _Plant(str(marker))}, path)


def test_planted_pickles_and_outside_latest_are_refused_everywhere(tmp_path, reference, capsys):
    """Each .pt file of a checkpoint, in turn, holds a pickle that would create a marker
    file: resume's check, DeepSpeed's own loader, the RNG load, eval, generate and convert all
    refuse it with one line, and the marker never appears."""
    from megaponder.cli import main as cli
    from megaponder.train.checkpoint import weights_only_loads

    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from convert_checkpoint import main as convert

    source = reference[0] / "checkpoints" / f"global_step{STEPS}"
    marker = tmp_path / "pwned"
    files = sorted(p.relative_to(source) for p in source.rglob("*.pt"))
    # universal/ holds three files per parameter, all read by the same loader: plant in one
    universal = [f for f in files if f.parts[0] == "universal"]
    files = [f for f in files if f.parts[0] != "universal"] + universal[:1]
    assert {str(f) for f in files} >= {"model.pt", "rng/rank0.pt",
                                       "deepspeed/state/mp_rank_00_model_states.pt"}
    for rel in files:
        folder = tmp_path / str(rel).replace("/", "_") / "checkpoints" / "global_step12"
        shutil.copytree(source, folder)
        (folder.parent / "latest").write_text("global_step12\n")
        _plant(folder / rel, marker)
        problem = ckpt.verify_checkpoint(str(folder))
        assert problem.startswith(ckpt.UNSAFE) and str(rel) in problem, problem
        with pytest.raises(ckpt.CheckpointError, match="refusing"):
            ckpt.safe_load(str(folder / rel))
        with pytest.raises(ckpt.CheckpointError, match="refusing"):  # DeepSpeed's call, as it makes it
            with weights_only_loads():
                torch.load(folder / rel, weights_only=False)
        if str(rel) == "model.pt":
            run_dir = str(folder.parent.parent)
            assert cli(["eval", "--checkpoint", run_dir, "--data", "x", "--device", "cpu"]) == 2
            assert cli(["generate", "--checkpoint", run_dir, "--prompt", "a", "--device", "cpu"]) == 2
            assert convert(["--from", "megaponder", "--to", "hf", "--input", run_dir,
                            "--output", str(tmp_path / "hf")]) == 2
            err = capsys.readouterr().err
            assert err.count("refusing to load it") == 3 and "Traceback" not in err
    assert not marker.exists()

    # `latest` naming anything but a global_step<N> folder of the same checkpoints/ folder
    root = tmp_path / "model.pt" / "checkpoints"
    for bad in ("../../elsewhere", "/etc", "global_step12/../../x", "step12"):
        (root / "latest").write_text(bad + "\n")
        for call in (lambda: ckpt.resolve_checkpoint(str(root.parent)),
                     lambda: claim_run_dir(str(root.parent), str(root), True, False)):
            with pytest.raises(ckpt.CheckpointError, match="refusing to follow"):
                call()
    os.symlink(source, root / "global_step99")
    (root / "latest").write_text("global_step99\n")
    with pytest.raises(ckpt.CheckpointError, match="link out of"):
        ckpt.resolve_checkpoint(str(root.parent))


def test_damaged_files_name_the_file(tmp_path, reference):
    source = reference[0] / "checkpoints" / f"global_step{STEPS}"
    folder = tmp_path / "c"
    shutil.copytree(source, folder)
    assert ckpt.verify_checkpoint(str(folder)) is None
    (folder / "meta.json").write_text('{"step": 1')
    with pytest.raises(ckpt.CheckpointError, match=r"meta.json is damaged"):
        ckpt.read_meta(str(folder))
    assert "meta.json is damaged" in ckpt.verify_checkpoint(str(folder))
    shutil.copy(source / "meta.json", folder / "meta.json")
    for rel in ("rng/rank0.pt", "deepspeed/state/mp_rank_00_model_states.pt", "model.pt"):
        data = (source / rel).read_bytes()
        (folder / rel).write_bytes(data[: len(data) // 2])
        problem = ckpt.verify_checkpoint(str(folder))
        assert f"{rel} is damaged or truncated" in problem and "\n" not in problem, problem
        shutil.copy(source / rel, folder / rel)
    (folder / "config.yml").write_text("model: [unclosed\n")
    with pytest.raises(ckpt.CheckpointError, match="config.yml is damaged"):
        ckpt.load_model(str(folder))
    # universal (layout-free) per-parameter files, read on a resume at another layout
    from megaponder.train.reshard import _read
    param_dir = tmp_path / "universal" / "embed_in.weight"
    param_dir.mkdir(parents=True)
    torch.save({"param": torch.ones(3)}, param_dir / "fp32.pt")
    assert torch.equal(_read(str(param_dir), "fp32", (3,)), torch.ones(3))
    data = (param_dir / "fp32.pt").read_bytes()
    (param_dir / "fp32.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"fp32.pt is damaged or truncated"):
        _read(str(param_dir), "fp32", (3,))


def test_publish_moves_the_old_tag_aside_and_recover_repairs_every_kill_point(tmp_path):
    root = tmp_path / "checkpoints"

    def staged(tag, content):
        stage = root / f".tmp-{tag}"
        stage.mkdir(parents=True)
        (stage / "meta.json").write_text(content)

    staged("global_step4", "old")
    ckpt.publish(str(root), "global_step4")
    staged("global_step4", "new")
    ckpt.publish(str(root), "global_step4")  # re-save of an existing tag
    assert (root / "global_step4" / "meta.json").read_text() == "new"
    assert sorted(os.listdir(root)) == ["global_step4", "latest"]
    # killed after the move aside: the old copy goes back in place
    os.replace(root / "global_step4", root / ".old-global_step4")
    staged("global_step8", "x")  # and a save of another tag cut short
    assert ckpt.recover(str(root))
    assert sorted(os.listdir(root)) == ["global_step4", "latest"]
    # killed after the new one is in place but before the aside copy was deleted
    shutil.copytree(root / "global_step4", root / ".old-global_step4")
    ckpt.recover(str(root))
    assert sorted(os.listdir(root)) == ["global_step4", "latest"]
    # retention keeps the newest N (and always the one latest names)
    for step in (8, 12):
        staged(f"global_step{step}", "x")
        ckpt.publish(str(root), f"global_step{step}")
    assert ckpt.prune(str(root), 2) == ["global_step4"]
    assert ckpt.complete_tags(str(root)) == ["global_step12", "global_step8"]
    (root / "latest").write_text("global_step8\n")
    assert ckpt.prune(str(root), 1) == []  # global_step8 is what latest names


def test_run_dir_lock_and_fresh_start_rules(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunDirLock(str(run_dir))
    lock.acquire()
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):
        RunDirLock(str(run_dir)).acquire()  # flock: a second open file description is refused
    lock.release()
    # the lock dies with its holder, even by SIGKILL: a killed holder leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time; "
                               f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    with pytest.raises(RunDirBusy):
        RunDirLock(str(run_dir)).acquire()
    holder.kill()
    holder.wait()
    lock.acquire()
    lock.release()

    root = run_dir / "checkpoints"
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # torn
    with pytest.raises(ckpt.ConfigError, match="already holds a run"):
        claim_run_dir(str(run_dir), str(root), False, False)
    with pytest.raises(ckpt.ConfigError, match="train.resume=true but"):
        claim_run_dir(str(run_dir), str(root), True, False)
    from megaponder.train.metrics import MetricsWriter, read_metrics
    with pytest.warns(UserWarning, match="torn line"):
        assert read_metrics(str(run_dir)) == [{"step": 1, "loss": 2.0}]
    with pytest.warns(UserWarning):
        MetricsWriter(str(run_dir), True, resume_step=1)  # resume truncates the torn line
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    lock, resumes, notes = claim_run_dir(str(run_dir), str(root), "auto", False)
    lock.release()  # auto without a checkpoint: a fresh start that clears the old metrics
    assert not resumes and not (run_dir / "metrics.jsonl").exists() and notes


def test_stop_request_signals_and_deadline():
    """In-process: the handlers the loop installs (the end-to-end tests send real SIGTERMs)."""
    from megaponder.train.guards import StopRequest, signal_from_name

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest("usr1")
    try:
        assert stop.local_reason() is None and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.local_reason() == "SIGUSR1"
        stop.reason = None
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: save and stop, no KeyboardInterrupt
        assert stop.local_reason() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before
    stop = StopRequest(exit_after_minutes=1e-4)  # 6 ms
    assert not stop.should_stop()
    time.sleep(0.01)
    assert stop.should_stop() and stop.local_reason() == "train.exit_after_minutes"
    stop.close()
    assert signal_from_name("SIGTERM") == signal.SIGTERM == signal_from_name("15")
    from megaponder.config import ConfigError, load_config
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml"),
                    ["train.preempt_signal=SIGKILL", "train.keep_last=-1", "train.run_dir="],
                    check_paths=False)
    for problem in ("cannot be caught", "train.keep_last must be >= 0", "train.run_dir is empty"):
        assert problem in str(err.value)


def test_loss_guard_spike_rule_and_counters():
    from megaponder.train.guards import LossGuard, injected_nan_steps

    g = LossGuard(spike_factor=2.0, spike_warmup=3)
    for loss in (4.0, 4.2, 3.8):
        assert g.local_flag([loss], 1.0) == 0  # warm-up: the rule is not armed yet
        g.update([loss], skipped=False)
    assert abs(g.running_mean() - 4.0) < 0.01  # bias-corrected EMA
    assert g.local_flag([7.9], 1.0) == 0 and g.local_flag([8.1, 8.1], 1.0) == 1
    assert g.local_flag([3.0], float("inf")) == 1 and g.local_flag([float("nan"), 3.0], 1.0) == 1
    g.update([8.1], skipped=True)
    g.update([9.0], skipped=True)
    assert (g.skipped_total, g.skipped_in_row) == (2, 2)
    restored = LossGuard(2.0, 3)
    restored.load_state_dict(g.state_dict())  # what a checkpoint carries
    assert restored.state_dict() == g.state_dict()
    g.update([4.0], skipped=False)
    assert (g.skipped_total, g.skipped_in_row) == (2, 0)
    assert LossGuard().local_flag([1e9], 1.0) == 0  # off by default
    os.environ["MEGAPONDER_FAULT_NAN"] = "1@3, 0@4,1@7"
    try:
        assert injected_nan_steps(1) == {3, 7} and injected_nan_steps(0) == {4}
    finally:
        del os.environ["MEGAPONDER_FAULT_NAN"]


def test_rng_state_round_trips_under_weights_only(tmp_path):
    """The RNG file is plain tensors/values (weights_only loads it); files of older
    megaponder versions (numpy's state tuple) still load, through numpy's array class only."""
    import numpy as np

    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    for legacy in (False, True):
        state = ckpt.rng_state()
        if legacy:
            state = {**state, "numpy": np.random.get_state(), "python": random.getstate()}
        path = tmp_path / f"rank0-{legacy}.pt"
        torch.save(state, path)
        expected = draw()
        ckpt.set_rng_state(ckpt.load_rng_file(str(path)))
        assert draw() == expected
