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


# -- test tiers -------------------------------------------------------------------------------
# Every test gets one of three markers at collection, so `make test-fast` can run the
# in-process tier alone (`-m inprocess`) while `make test` still runs everything:
#   spawn     - starts a process (a CLI subprocess, torchrun, torch.multiprocessing) in the test
#               or in a fixture it uses: seconds of interpreter and DeepSpeed start-up each;
#   slow      - in-process but among the long ones (SLOW_TESTS, measured with --durations);
#   inprocess - everything else.
# "spawn" is found from the code, not a hand-kept list: the test function, its fixtures and
# every function of tests/ they reach through their globals are searched for a name bound to a
# process-starting module or function. With MEGAPONDER_CHECK_TIERS=1 the in-process tier also
# fails any test that starts a process after all (the check that the detection is right).
import inspect  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_SPAWNERS = {subprocess, subprocess.run, subprocess.Popen, subprocess.check_call,
             subprocess.check_output, os.system}
try:
    import multiprocessing
    import torch.multiprocessing as _tmp

    _SPAWNERS |= {multiprocessing, _tmp, _tmp.spawn, _tmp.start_processes}
except ImportError:  # pragma: no cover
    pass

#: in-process tests that take the longest (each >= ~4 s on the 2-core machine, idle); the
#: nodeid prefix matches every parametrization
SLOW_TESTS: tuple[str, ...] = ()


def _spawns(obj, seen: set) -> bool:
    """Does ``obj`` (a function defined under tests/) start a process, directly or through
    a tests/ function it names?"""
    code = getattr(obj, "__code__", None)
    if code is None or id(obj) in seen:
        return False
    seen.add(id(obj))
    if not os.path.abspath(code.co_filename).startswith(_TESTS_DIR):
        return False
    names, stack = set(), [code]
    while stack:  # nested functions, lambdas and comprehensions are constants of the code
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    glb = getattr(obj, "__globals__", {})
    # modules it names (imported at the top or inside the function), then what it reads from them
    modules = [m for m in (glb.get(n, sys.modules.get(n)) for n in names) if inspect.ismodule(m)]
    targets = [glb.get(n) for n in names] + [getattr(m, n, None) for m in modules for n in names]
    for target in targets:
        try:
            if target in _SPAWNERS:
                return True
        except TypeError:  # unhashable
            continue
        if inspect.isclass(target):
            if any(_spawns(m, seen) for m in vars(target).values() if inspect.isfunction(m)):
                return True
        elif callable(target) and _spawns(getattr(target, "__wrapped__", target), seen):
            return True
    return False


def _fixture_funcs(item):
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixdef in (info.name2fixturedefs.get(name, ()) if info else ()):
            if name != "_inprocess_tier_check":  # the checker itself patches, never spawns
                yield fixdef.func


def pytest_configure(config):
    config.addinivalue_line("markers", "spawn: starts processes (CLI, torchrun, multiprocessing)")
    config.addinivalue_line("markers", "slow: in-process but long (SLOW_TESTS in tests/conftest.py)")
    config.addinivalue_line("markers", "inprocess: runs in the pytest process, quickly (make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        seen: set = set()
        funcs = [getattr(item, "function", None), *_fixture_funcs(item)]
        if any(f is not None and _spawns(f, seen) for f in funcs):
            item.add_marker(pytest.mark.spawn)
        elif item.nodeid.startswith(SLOW_TESTS) if SLOW_TESTS else False:
            item.add_marker(pytest.mark.slow)
        else:
            item.add_marker(pytest.mark.inprocess)


@pytest.fixture(autouse=True)
def _inprocess_tier_check(request, monkeypatch):
    """MEGAPONDER_CHECK_TIERS=1: a test marked inprocess that starts a process fails."""
    if os.environ.get("MEGAPONDER_CHECK_TIERS") != "1" or request.node.get_closest_marker("inprocess") is None:
        yield
        return
    started = []
    real = subprocess.Popen._execute_child

    def record(self, args, *rest, **kw):
        started.append(args)
        return real(self, args, *rest, **kw)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", record)
    import multiprocessing.process
    real_start = multiprocessing.process.BaseProcess.start

    def record_start(self):
        started.append(f"multiprocessing {self.name}")
        return real_start(self)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", record_start)
    yield
    assert not started, (f"{request.node.nodeid} is marked inprocess but started {started[0]!r}; "
                         f"tests/conftest.py did not see how it spawns")
