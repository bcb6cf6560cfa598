"""The deepspeed launcher's multi-node path (pdsh over ssh) across two emulated nodes.

Two nodes are two network namespaces joined by a veth pair, each with its own sshd, hosts file
and PID namespace (tests/cluster/netns_hosts.sh). The launcher runs on node 1 as a user would
run it on the first node of an allocation:

    deepspeed --hostfile H --master_addr mpnode1 --ssh_port 2222 --module megaponder train ...

Needs root, `ip netns`, sshd and pdsh (tests/cluster/netns_prereqs.sh installs the last two);
the whole module skips in one line otherwise. Marked ``netns``."""
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .launcher_runs import (HERE, REPO, STEP_SLEEP, STEPS, assert_saved_by_both_ranks, assert_same_curve,
                           demo_data, latest_step, launcher_env, losses, reference_losses, running,
                           train_cmd, wait_for_steps)

NETNS_HOSTS = os.path.join(HERE, "netns_hosts.sh")
SSH_PORT = 2222
NODES = ("mpnode1", "mpnode2")
IFACE = "mpeth0"


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


_MISSING = _netns_missing()
if _MISSING:
    pytest.skip(f"two emulated nodes: {_MISSING}", allow_module_level=True)
pytestmark = pytest.mark.netns


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
    cmd = ["ip", "netns", "exec", NODES[0]] + train_cmd(
        ["--hostfile", str(hostfile), "--master_addr", NODES[0], "--ssh_port", str(SSH_PORT)],
        run_dir, data, *extra)
    return cmd, launcher_env(DS_ENV_FILE=str(env_file))


def test_two_nodes_sigterm_to_launcher_saves_on_both_and_resume_is_exact(tmp_path, nodes):
    data, reference = demo_data(), reference_losses()
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    rx_before = nodes.rx_bytes(NODES[1])
    cmd, env = _multinode_cmd(tmp_path, run_dir, data, step_sleep=STEP_SLEEP)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for_steps(proc, run_dir, 3, log)
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
    stop = latest_step(run_dir)
    assert 3 <= stop < STEPS, open(log).read()[-3000:]
    assert_saved_by_both_ranks(run_dir, stop)
    deadline = time.time() + 120
    while any(nodes.job_processes(n) for n in NODES):  # node 2's ranks, launch.py, ssh sessions
        assert time.time() < deadline, [nodes.job_processes(n) for n in NODES]
        time.sleep(0.2)
    # the gradients crossed the veth pair: node 2 received at least 1 MB per step
    # (~4.6 MB expected: one all-reduce of 1.15M fp32 gradients)
    assert nodes.rx_bytes(NODES[1]) - rx_before > stop * 1_000_000

    # continue across the two nodes: the curve equals the uninterrupted one-node run's
    cmd, env = _multinode_cmd(tmp_path, run_dir, data, "train.resume=true")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout + proc.stderr
    assert f"resumed from {run_dir}/checkpoints/global_step{stop} at step {stop}" in stdout, stdout[-3000:]
    assert_same_curve(reference, losses(run_dir))
    assert not any(nodes.job_processes(n) for n in NODES)


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


def test_teardown_leaves_nothing(nodes):
    """`down` removes the namespaces, their processes, the per-node /etc/netns files and the
    test key; a second `down` is a no-op and `up` works again after it."""
    pids = nodes.pids(NODES[0]) + nodes.pids(NODES[1])
    assert pids
    nodes.down()
    nodes.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in NODES)
    assert not [p for p in pids if running(p)]
    assert not any(os.path.exists(f"/etc/netns/{n}") for n in NODES)
    assert not os.path.exists(nodes.state)
