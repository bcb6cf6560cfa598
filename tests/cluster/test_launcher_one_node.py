"""SIGTERM to DeepSpeed's launcher on one node (`deepspeed --num_gpus 2 --module megaponder
train ...`), as a batch script's trap sends it: the runner dies at once and never tells
launch.py; megaponder's ranks must save and exit instead of training on as orphans."""
import os
import signal
import subprocess
import time

from .launcher_runs import (REPO, STEP_SLEEP, STEPS, assert_saved_by_both_ranks, demo_data, free_port,
                           group_members, latest_step, launcher_env, losses, processes_with,
                           reference_losses, train_cmd, wait_for_steps)


def test_sigterm_to_one_node_launcher_saves_and_leaves_no_orphan(tmp_path):
    data, reference = demo_data(), reference_losses()
    """`kill RUNNER` (what a batch script's trap does): DeepSpeed's runner dies at once (it
    installs no handler on the one-node path) and never tells launch.py; the ranks see it gone,
    finish the step, save, exit 0, and launch.py exits after them."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    with open(log, "w") as out:  # in its own process group, as `setsid deepspeed ...`
        proc = subprocess.Popen(train_cmd(["--num_gpus", "2", "--master_port", str(free_port())],
                                           run_dir, data),
                                cwd=REPO, env=launcher_env(MEGAPONDER_FAULT_STEP_SLEEP=STEP_SLEEP),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_steps(proc, run_dir, 3, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the runner itself is simply killed
    # what a batch script can wait for: the launcher's process group (launch.py, the ranks)
    deadline = time.time() + 120
    while group_members(proc.pid):
        assert time.time() < deadline, f"still running: {group_members(proc.pid)}"
        time.sleep(0.2)
    assert not processes_with(str(run_dir)), "a rank left the launcher's process group"
    text = open(log).read()
    stop = latest_step(run_dir)
    assert stop < STEPS, text[-3000:]
    assert f"the deepspeed launcher (pid {proc.pid}) exited: stopped after step {stop}" in text, text[-3000:]
    assert text.count("exits successfully") == 2, text[-3000:]  # launch.py: both ranks exit 0
    assert_saved_by_both_ranks(run_dir, stop)
    got = losses(run_dir)
    assert max(got) == stop and all(abs(got[s] - reference[s]) <= 1e-6 for s in got)
