"""One 2-rank job per launcher: torchrun, the deepspeed launcher, mpirun (if installed) and
the SLURM sbatch dry-run. Each runs megaponder.train.selftest (tp=2, 2 DeepSpeed steps);
both tensor-parallel ranks must report the same losses."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_utils import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _deepspeed_shm_buffers():
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def _selftest_lines(cmd, env=None):
    shm_before = _deepspeed_shm_buffers()
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=300)
    # DeepSpeed's CPU shm comm op maps 69 MB per rank in /dev/shm and never unlinks it; megaponder
    # keeps it from starting (parallel.state.skip_cpu_shm_comm_op). A leak here fills RAM run by run.
    assert _deepspeed_shm_buffers() <= shm_before, "DeepSpeed left shared-memory buffers in /dev/shm"
    lines = [json.loads(l.split("SELFTEST ", 1)[1]) for l in
             (proc.stdout + proc.stderr).replace("SELFTEST", "\nSELFTEST").splitlines()
             if l.startswith("SELFTEST ")]
    assert proc.returncode == 0 and len(lines) == 2, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert sorted(r["rank"] for r in lines) == [0, 1] and all(r["world"] == 2 for r in lines)
    assert lines[0]["losses"] == lines[1]["losses"]
    return lines


def test_torchrun():
    _selftest_lines([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port",
                     str(free_port()), "-m", "megaponder.train.selftest", "--tp", "2"])


def test_deepspeed_launcher():
    _selftest_lines([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                     str(free_port()), "megaponder/train/selftest.py", "--tp", "2"])


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed (apt-get install openmpi-bin)")
def test_mpirun():
    env = _env()
    env["MASTER_PORT"] = str(free_port())
    lines = _selftest_lines(["mpirun", "--allow-run-as-root", "-np", "2", "--mca", "btl", "self,vader",
                             "--mca", "oob_tcp_if_include", "lo", "-x", "MASTER_PORT", "-x", "PATH",
                             "-x", "DS_ACCELERATOR", sys.executable, "-m", "megaponder.train.selftest",
                             "--tp", "2"], env)
    assert all(r["source"] == "openmpi" for r in lines)


def test_slurm_sbatch_dry_run(tmp_path):
    env = _env()
    env.update(DRY_RUN="1", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_GPUS_ON_NODE="4",
               HOSTFILE=str(tmp_path / "hostfile"), PY=sys.executable)
    out = subprocess.run(["bash", "examples/slurm/train.sbatch", "examples/configs/tiny.yml",
                          "--set", "parallel.tp=2"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "gpu07 slots=4\ngpu08 slots=4" in out.stdout
    assert "--master_addr gpu07" in out.stdout and "parallel.tp=2" in out.stdout
    assert not (tmp_path / "hostfile").exists()  # dry run writes nothing
    out = subprocess.run(["bash", "examples/slurm/train_srun.sbatch", "x.yml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "srun" in out.stdout
