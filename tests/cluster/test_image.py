"""docker/Dockerfile built with buildah on the CPU stand-in of its NGC base (Debian + CPU torch +
NGC's pip constraint file, docker/ngc_standin/), and run: it trains, keeps every base package,
refuses a pin the constraint file forbids (as docker/check_pins.py does), and makes its own ssh
host keys per container.

The build is cached by docker/build_image.sh (a hash of its inputs), so `make image-check` builds
once and this module then reuses the image. From scratch it takes minutes (BENCHMARKS-style
timings in docker/README.md); run as root, with buildah installed or apt-get to install it.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest_data import demo_run_sets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(REPO_ROOT, "docker", "build_image.sh")
STANDIN = os.path.join(REPO_ROOT, "docker", "ngc_standin", "build.sh")

_CANNOT = ("not root" if os.geteuid() != 0 else
           "" if shutil.which("buildah") or shutil.which("apt-get") else "no buildah and no apt-get")
pytestmark = [pytest.mark.image, pytest.mark.timeout(3600),
              pytest.mark.skipif(bool(_CANNOT), reason=f"image build needs root and buildah "
                                                     f"(or apt-get to install it): {_CANNOT}")]


def _script(path):
    proc = subprocess.run(["bash", path], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{path} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


def bah(*args, check=True):
    """buildah with the store settings of docker/buildah_env.sh."""
    proc = subprocess.run(["bash", "-c", 'source docker/buildah_env.sh && bah "$@"', "bah", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args[:3])} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in(image, script, volumes=(), check=True):
    """Run a bash script in a fresh container of ``image`` (removed afterwards)."""
    ctr = bah("from", "--pull=false", image).stdout.strip().splitlines()[-1]
    try:
        vol = [a for v in volumes for a in ("--volume", v)]
        return bah("run", *vol, ctr, "--", "bash", "-ec", script, check=check)
    finally:
        bah("rm", ctr, check=False)


@pytest.fixture(scope="module")
def standin():
    return _script(STANDIN)


@pytest.fixture(scope="module")
def image(standin):
    return _script(BUILD)


TRAIN_SETS = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
              "data.seq_length=32", "train.micro_batch_size=4", "train.log_every=1",
              "train.progress_bar=false", "optim.warmup_steps=3", "train.eval_batches=2",
              "train.threads=1", "train.steps=6"]


def _train_args(data, run_dir):
    return ["train", "--config", "examples/configs/tiny.yml", *demo_run_sets(TRAIN_SETS, run_dir, data)]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_image_trains_inside_like_the_cpu_venv(image, demo_data, tmp_path):
    """6 steps of the tiny model inside the image (its torch is the stand-in's, untouched), a
    checkpoint saved, and the same losses as this venv: both run torch 2.13.0 CPU, fp32, one
    thread, on the same data; only numpy (the image's 1.26) and a few pure-Python packages
    differ, and none of them touches the arithmetic. 1e-6 allows for float printing only."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    inside = run_in(image, " ".join(["megaponder", *_train_args("/data", "/run")]) + " && "
                    "python -c 'import torch, yaml, numpy; print(torch.__version__, yaml.__version__, "
                    "numpy.__version__)' && python -m pip check",
                    volumes=[f"{demo_data}:/data:ro", f"{run_dir}:/run"])
    versions = inside.stdout.strip().splitlines()[-2].split()
    assert versions == ["2.13.0+cpu", "6.0.2", "1.26.4"], inside.stdout[-2000:]  # the base's own
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 7)), losses
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert (run_dir / "checkpoints" / "global_step6" / "model.pt").is_file()

    here = tmp_path / "venv-run"
    proc = subprocess.run([sys.executable, "-m", "megaponder",
                           *_train_args(str(demo_data), str(here))],
                          capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    venv = _losses(here)
    assert all(abs(losses[s] - venv[s]) <= 1e-6 for s in venv), (losses, venv)


def test_image_keeps_every_package_of_the_base(image):
    """Nothing the base's constraint file pins was replaced by the build."""
    out = run_in(image, "cat /etc/pip/constraint.txt; echo ===; "
                        "python -m pip list --format=freeze --disable-pip-version-check").stdout
    pinned, installed = out.split("===")
    def name_version(line):
        name, version = line.split("==", 1)
        return re.sub(r"[-_.]+", "-", name).lower(), version

    have = dict(name_version(line) for line in installed.split() if "==" in line)
    pins = [name_version(line) for line in pinned.splitlines() if line and not line.startswith("#")]
    assert len(pins) > 20 and ("pyyaml", "6.0.2") in pins
    changed = [(n, v, have[n]) for n, v in pins if n in have and have[n] != v]
    assert not changed, changed


def test_a_pin_the_constraint_file_forbids_fails_pip_and_check_pins(standin, tmp_path):
    """pyyaml==6.0.3 (the old requirements/gpu.txt pin) against the base's pyyaml 6.0.2: pip in
    the stand-in says ResolutionImpossible, and check_pins.py fails on the same file."""
    gpu = open(os.path.join(REPO_ROOT, "requirements", "gpu.txt")).read()
    bad = tmp_path / "gpu.txt"
    bad.write_text(re.sub(r"^pyyaml.*$", "pyyaml==6.0.3", gpu, flags=re.M))
    proc = run_in(standin, "python -m pip install --dry-run --no-deps pyyaml==6.0.3", check=False)
    assert proc.returncode != 0 and "ResolutionImpossible" in proc.stderr + proc.stdout, proc.stderr
    check = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "docker", "check_pins.py"),
                            "--pins", str(bad)], capture_output=True, text=True)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "pyyaml==6.0.3 conflicts with the image's constraint pyyaml==6.0.2" in check.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_key_of_a_new_container(image):
    """Start sshd the documented way (start-sshd) on a loopback port in a new container and read
    the host key it serves."""
    port = _free_port()
    out = run_in(image, f"""
        test -z "$(ls /etc/ssh/ssh_host_* 2>/dev/null)" || {{ echo "host keys in the image"; exit 3; }}
        SSH_PORT={port} start-sshd -o ListenAddress=127.0.0.1 -o PidFile=/run/sshd-test.pid
        key=
        for _ in $(seq 100); do  # sshd forks into the background: wait until it answers
            key=$(ssh-keyscan -p {port} -t ed25519 127.0.0.1 2>/dev/null || true)
            [ -n "$key" ] && break
            sleep 0.1
        done
        kill "$(cat /run/sshd-test.pid)" || true
        echo "KEY $key"
    """).stdout
    found = re.search(r"^KEY \S+ (ssh-ed25519 \S+)", out, re.M)  # [127.0.0.1]:PORT ssh-ed25519 KEY
    assert found, out
    return found.group(1)


def test_sshd_makes_its_own_host_keys_per_container(image):
    first, second = _host_key_of_a_new_container(image), _host_key_of_a_new_container(image)
    assert first != second
