"""Suite-wide settings: offline, few threads, deterministic, nothing left in /tmp."""
import atexit
import os
import shutil
import tempfile

# One temp folder for the session, removed when it ends: what the suite and its subprocesses
# put in the temp dir (torchrun's and the deepspeed launcher's torchelastic_* log folders, the
# shared demo corpus, pytest's tmp_path folders) would otherwise stay in /tmp after every run.
_SESSION_TMP = tempfile.mkdtemp(prefix="megaponder-tests-")
os.environ["TMPDIR"] = _SESSION_TMP  # inherited by every subprocess
tempfile.tempdir = _SESSION_TMP
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_tool():
    """tools/convert_checkpoint.py as a module, so tests call its ``main`` in this process
    (saves an interpreter start per conversion)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture
def repo_root():
    return REPO_ROOT


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs two emulated cluster nodes (network namespaces "
                            "with sshd, root; tests/cluster/netns_prereqs.sh installs sshd and pdsh)")
    config.addinivalue_line(
        "markers", "image: builds docker/Dockerfile with buildah on the NGC stand-in (root; "
        "`make image-check`)")
