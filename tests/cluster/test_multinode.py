"""The deepspeed launcher as cluster users run it: across two emulated nodes (pdsh over ssh)
and on one node, each stopped by a SIGTERM to the launcher alone.

Two nodes are two network namespaces joined by a veth pair, each with its own sshd, hosts file
and PID namespace (tests/cluster/netns_hosts.sh). The launcher runs on node 1 as a user would
run it on the first node of an allocation:

    deepspeed --hostfile H --master_addr mpnode1 --ssh_port 2222 --module megaponder train ...

The reference for every loss curve is an uninterrupted 2-rank run of the same launcher on one
node (dp=2 both times, same gloo all-reduce between the two ranks, so the curves are equal
bit for bit; 1e-6 leaves room for nothing but float printing)."""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
NETNS_HOSTS = os.path.join(HERE, "netns_hosts.sh")
SSH_PORT = 2222
NODES = ("mpnode1", "mpnode2")
IFACE = "mpeth0"
STEPS = 40
STEP_SLEEP = "0.25"  # slows the signalled runs down so that the SIGTERM lands mid-run
TRAIN_SETS = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.rotary_pct=1.0",
              "data.seq_length=32", "train.micro_batch_size=2", "train.log_every=1",
              "train.progress_bar=false", "optim.warmup_steps=3", "train.eval_batches=2",
              "train.threads=1", f"train.steps={STEPS}"]


def _netns_missing():
    """Why the two-node tests cannot run here, in one line (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "no working `ip netns` (iproute2)"
    missing = [p for p, path in (("openssh-server", "/usr/sbin/sshd"), ("pdsh", shutil.which("pdsh") or ""))
               if not os.path.exists(path)]
    if missing:
        return f"{' and '.join(missing)} not installed: run tests/cluster/netns_prereqs.sh (root, apt)"
    return None


def netns(test):
    """Marks a two-node test (``pytest -m netns`` selects them) and skips it in one line where
    the emulation cannot run."""
    reason = _netns_missing()
    return pytest.mark.netns(pytest.mark.skipif(reason is not None, reason=f"two emulated nodes: {reason}")(test))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(run_dir, data, *extra):
    out = []
    for s in TRAIN_SETS + [f"train.run_dir={run_dir}", f"data.path=[{data}/train_text_document]",
                           f"data.valid_path=[{data}/validation_text_document]",
                           f"data.tokenizer_model={data}/tokenizer.model", *extra]:
        out += ["--set", s]
    return out


def _train_cmd(launcher_args, run_dir, data, *extra):
    return ([os.path.join(BIN, "deepspeed"), *launcher_args, "--module", "megaponder", "train",
             "--config", "examples/configs/tiny.yml", *_sets(run_dir, data, *extra)])


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _logged_steps(run_dir):
    try:
        return len(_losses(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _wait_for_steps(proc, run_dir, n, log, timeout=180):
    deadline = time.time() + timeout
    while _logged_steps(run_dir) < n:
        assert proc.poll() is None, f"the run ended before step {n}:\n{open(log).read()[-3000:]}"
        assert time.time() < deadline, f"no step {n} after {timeout} s:\n{open(log).read()[-3000:]}"
        time.sleep(0.05)


def _latest_step(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return int(f.read().strip().removeprefix("global_step"))


def _assert_saved_by_both_ranks(run_dir, step):
    from megaponder.train import checkpoint as ckpt
    folder = os.path.join(run_dir, "checkpoints", f"global_step{step}")
    assert ckpt.verify_checkpoint(folder, rank=0, world_size=2) is None, os.listdir(folder)
    assert sorted(os.listdir(os.path.join(folder, "rng"))) == ["rank0.pt", "rank1.pt"]


def _assert_same_curve(reference, got):
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    worst = max(abs(reference[s] - got[s]) for s in reference)
    assert worst <= 1e-6, (worst, [(s, reference[s], got[s]) for s in reference if reference[s] != got[s]][:5])


@pytest.fixture(scope="module")
def demo_data():
    from conftest_data import demo_corpus_dir  # built once per test session
    return demo_corpus_dir()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_data):
    """Uninterrupted: the deepspeed launcher, one node, 2 ranks."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(_train_cmd(["--num_gpus", "2", "--master_port", str(free_port())], run_dir, demo_data),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return _losses(run_dir)


# -- one node ---------------------------------------------------------------------------------
def _processes_with(text):
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


def test_sigterm_to_one_node_launcher_saves_and_leaves_no_orphan(tmp_path, demo_data, reference):
    """`kill RUNNER` (what a batch script's trap does): DeepSpeed's runner dies at once (it
    installs no handler on the one-node path) and never tells launch.py; the ranks see it gone,
    finish the step, save, exit 0, and launch.py exits after them."""
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    with open(log, "w") as out:  # in its own process group, as `setsid deepspeed ...`
        proc = subprocess.Popen(_train_cmd(["--num_gpus", "2", "--master_port", str(free_port())],
                                           run_dir, demo_data),
                                cwd=REPO, env=_env(MEGAPONDER_FAULT_STEP_SLEEP=STEP_SLEEP),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_steps(proc, run_dir, 3, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the runner itself is simply killed
    # what a batch script can wait for: the launcher's process group (launch.py, the ranks)
    deadline = time.time() + 120
    while _group_members(proc.pid):
        assert time.time() < deadline, f"still running: {_group_members(proc.pid)}"
        time.sleep(0.2)
    assert not _processes_with(str(run_dir)), "a rank left the launcher's process group"
    text = open(log).read()
    stop = _latest_step(run_dir)
    assert stop < STEPS, text[-3000:]
    assert f"the deepspeed launcher (pid {proc.pid}) exited: stopped after step {stop}" in text, text[-3000:]
    assert text.count("exits successfully") == 2, text[-3000:]  # launch.py: both ranks exit 0
    _assert_saved_by_both_ranks(run_dir, stop)
    got = _losses(run_dir)
    assert max(got) == stop and all(abs(got[s] - reference[s]) <= 1e-6 for s in got)


def _group_members(pgid):
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid and _running(int(pid)):
                members.append(int(pid))
        except OSError:
            pass
    return members


def _running(pid):
    """Alive and not a zombie (a dead process waits for the machine's init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# -- two emulated nodes -----------------------------------------------------------------------
class Nodes:
    """tests/cluster/netns_hosts.sh up/down around the module's two-node tests."""

    def __init__(self, state):
        self.state = state

    def up(self):
        subprocess.run(["bash", NETNS_HOSTS, "up", self.state], check=True, capture_output=True, timeout=120)

    def down(self):
        subprocess.run(["bash", NETNS_HOSTS, "down", self.state], check=True, capture_output=True, timeout=120)

    @staticmethod
    def pids(node):
        out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def job_processes(self, node):
        """Everything in the node's network namespace but its sshd (and the `unshare` above it)."""
        keep = []
        for pid in self.pids(node):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if not (cmd.startswith("unshare --pid") or cmd.startswith("sshd: /usr/sbin/sshd -D")):
                keep.append(f"{pid} {cmd[:120]}")
        return keep

    @staticmethod
    def rx_bytes(node):
        out = subprocess.run(["ip", "-n", node, "-j", "-s", "link", "show", IFACE], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    reason = _netns_missing()
    if reason:
        pytest.skip(f"two emulated nodes: {reason}")
    n = Nodes(str(tmp_path_factory.mktemp("netns") / "state"))
    n.up()
    try:
        yield n
    finally:
        n.down()


def _multinode_cmd(tmp_path, run_dir, data, *extra, step_sleep=None):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in NODES))
    # what the launcher exports to every node (its own environment does not travel over ssh)
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": IFACE,
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        **({"MEGAPONDER_FAULT_STEP_SLEEP": step_sleep} if step_sleep else {})}.items()))
    cmd = ["ip", "netns", "exec", NODES[0]] + _train_cmd(
        ["--hostfile", str(hostfile), "--master_addr", NODES[0], "--ssh_port", str(SSH_PORT)],
        run_dir, data, *extra)
    return cmd, _env(DS_ENV_FILE=str(env_file))


@netns
def test_two_nodes_sigterm_to_launcher_saves_on_both_and_resume_is_exact(tmp_path, nodes, demo_data, reference):
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    rx_before = nodes.rx_bytes(NODES[1])
    cmd, env = _multinode_cmd(tmp_path, run_dir, demo_data, step_sleep=STEP_SLEEP)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    _wait_for_steps(proc, run_dir, 3, log)
    # one rank in each node's namespaces, started through that node's sshd
    for node in NODES:
        ranks = [p for p in nodes.job_processes(node) if "-m megaponder" in p]
        assert len(ranks) == 1, (node, nodes.job_processes(node))
    proc.send_signal(signal.SIGTERM)
    # DeepSpeed's runner stops pdsh, runs `pkill -f <launch.py>` on every node through pdsh,
    # waits a second and exits 1; the ranks are still saving then
    assert proc.wait(timeout=120) == 1, open(log).read()[-3000:]
    # what a batch script can wait for: rank 0 holds the run-dir lock until it has exited,
    # after the checkpoint of every rank is published
    subprocess.run(["flock", "-w", "120", str(run_dir / ".lock"), "true"], check=True, timeout=150)
    stop = _latest_step(run_dir)
    assert 3 <= stop < STEPS, open(log).read()[-3000:]
    _assert_saved_by_both_ranks(run_dir, stop)
    deadline = time.time() + 120
    while any(nodes.job_processes(n) for n in NODES):  # node 2's ranks, launch.py, ssh sessions
        assert time.time() < deadline, [nodes.job_processes(n) for n in NODES]
        time.sleep(0.2)
    # the gradients crossed the veth pair: node 2 received at least 1 MB per step
    # (~4.6 MB expected: one all-reduce of 1.15M fp32 gradients)
    assert nodes.rx_bytes(NODES[1]) - rx_before > stop * 1_000_000

    # continue across the two nodes: the curve equals the uninterrupted one-node run's
    cmd, env = _multinode_cmd(tmp_path, run_dir, demo_data, "train.resume=true")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout + proc.stderr
    assert f"resumed from {run_dir}/checkpoints/global_step{stop} at step {stop}" in stdout, stdout[-3000:]
    _assert_same_curve(reference, _losses(run_dir))
    assert not any(nodes.job_processes(n) for n in NODES)


@netns
def test_a_closed_ssh_session_stops_the_ranks_of_its_node(tmp_path, nodes):
    """A node reached over ssh: a real sshd session starts DeepSpeed's launch.py, whose rank
    (a small script with megaponder's launcher watch) prints through the session. Killing the
    ssh client closes the session: the rank's next prints must not fail, and the watch fires."""
    report = tmp_path / "watch.txt"
    script = tmp_path / "rank.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from megaponder.train.launcher_watch import LauncherWatch, survive_closed_pipes\n"
        "watch = LauncherWatch.detect()\n"
        "survive_closed_pipes()\n"
        f"out = open({str(report)!r}, 'w')\n"
        "out.write(f'watching {watch.starter}\\n'); out.flush()\n"
        "deadline = time.time() + 60\n"
        "while time.time() < deadline and watch.gone() is None:\n"
        "    print('tick', flush=True)\n"
        "    time.sleep(0.05)\n"
        "for _ in range(5):\n"
        "    print('after', flush=True)\n"
        "out.write(f'gone: {watch.gone()}\\n'); out.close()\n")
    world = base64.urlsafe_b64encode(json.dumps({NODES[1]: [0]}).encode()).decode()
    remote = (f"cd {REPO}; {sys.executable} -u -m deepspeed.launcher.launch --world_info={world} "
              f"--node_rank=0 --master_addr={NODES[1]} --master_port=29500 --no_local_rank {script}")
    ssh = subprocess.Popen(["ip", "netns", "exec", NODES[0], "ssh", "-p", str(SSH_PORT), NODES[1], remote],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (report.exists() and "watching" in report.read_text()):
        assert ssh.poll() is None and time.time() < deadline, ssh.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    assert "watching the ssh session that started deepspeed.launcher.launch" in report.read_text()
    assert ssh.stdout.readline()  # the ticks come through the session
    ssh.kill()
    ssh.wait()
    while "gone:" not in report.read_text():
        assert time.time() < deadline, (report.read_text(), nodes.job_processes(NODES[1]))
        time.sleep(0.1)
    assert "gone: the ssh session that started deepspeed.launcher.launch" in report.read_text()
    while nodes.job_processes(NODES[1]):  # the rank and launch.py exit
        assert time.time() < deadline, nodes.job_processes(NODES[1])
        time.sleep(0.1)


@netns
def test_teardown_leaves_nothing(nodes):
    """`down` removes the namespaces, their processes, the per-node /etc/netns files and the
    test key; a second `down` is a no-op and `up` works again after it."""
    pids = nodes.pids(NODES[0]) + nodes.pids(NODES[1])
    assert pids
    nodes.down()
    nodes.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in NODES)
    assert not [p for p in pids if _running(p)]
    assert not any(os.path.exists(f"/etc/netns/{n}") for n in NODES)
    assert not os.path.exists(nodes.state)
