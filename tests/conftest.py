"""Suite-wide settings: offline, few threads, deterministic, nothing left in /tmp."""
import atexit
import os
import pathlib
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

from conftest_data import demo_corpus_dir  # noqa: E402

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


@pytest.fixture
def one_thread():
    """torch on one thread for the test: its tensors are tiny, and on a shared CPU a second
    thread only adds overhead (and waits, badly, on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data():
    """The demo corpus folder (tools/prepare_demo_corpus.py's files: train/validation
    .bin/.idx, tokenizer.model), built once per session and shared with
    conftest_data.demo_corpus_dir(); tests read it, or copy it before changing anything."""
    return pathlib.Path(demo_corpus_dir())


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
import fnmatch  # noqa: E402
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

#: in-process tests that take the longest (fnmatch patterns of node ids). The family-matrix
#: modules build, train and decode tiny models of every family on both backbones (measured
#: 1-12 s of CPU per test: test_families 124 s / 38 tests, test_families_consistency 101 s /
#: 21, test_fidelity 34 s / 24); FlexAttention and inductor
#: compile C++ in worker processes (minutes on 2 cores).
SLOW_TESTS: tuple[str, ...] = (
    "tests/test_families.py::*", "tests/test_families_consistency.py::*",
    "tests/test_fidelity.py::*", "tests/test_parallel_families.py::*", "tests/test_llama.py::*",
    "tests/test_parallel_wrap.py::*", "tests/test_train_compaction.py::*",
    "tests/test_hf_parity.py::*",
    # every family x backbone under torch's FlopCounter: ~2 s of CPU each
    "tests/test_flops.py::test_training_flops_match_flop_counter[[]*",
    "tests/test_flops.py::test_inference_flops_match_flop_counter[[]*",
    "tests/test_analysis_depth.py::test_adaponderlm_forced_halting_iterations_are_exact",
    "tests/test_analysis_depth.py::test_ponderlm3_iterations_are_the_executed_steps",
    "tests/test_analysis_depth.py::test_full_depth_counterfactual_and_entropy",
    "tests/test_analysis_depth.py::test_analyze_batches_end_to_end",
    "tests/test_attention.py::test_backend_matches_eager[[]*-flex[]]",
    "tests/test_attention.py::test_flex_*",
    "tests/test_perf_switches.py::test_compiled_layers_equal_eager_with_kv_reuse",
)


#: tests that start processes where the code search cannot see it (fnmatch patterns): worker
#: pools inside the package (data.workers > 1, DataLoader workers) and fixtures looked up by
#: name at run time; MEGAPONDER_CHECK_TIERS=1 found each of them
SPAWN_TESTS: tuple[str, ...] = (
    "tests/test_data_checks.py::test_all_bad_records_leave_previous_outputs_untouched[[]2[]]",
    "tests/test_data_checks.py::test_a_crash_leaves_previous_outputs_intact[[]2[]]",
    "tests/test_data_preprocess.py::test_bad_records_counted_with_line_numbers[[]2[]]",
    "tests/test_data_preprocess.py::test_workers_do_not_change_a_byte",
    "tests/test_data_preprocess.py::test_gzip_input_and_multiple_keys",
    "tests/test_data_preprocess.py::test_zstd_input_equals_plain_jsonl",
    "tests/test_data_sampler.py::test_worker_processes_give_the_same_batches",
    "tests/test_lm_eval.py::test_lm_eval_cli_reports_task_metrics_and_compute[[]*[]]",
)


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
    config.addinivalue_line("markers", "netns: needs two emulated cluster nodes (network namespaces "
                            "with sshd, root; tests/cluster/netns_prereqs.sh installs sshd and pdsh)")
    config.addinivalue_line(
        "markers", "image: builds docker/Dockerfile with buildah on the NGC stand-in (root; "
        "`make image-check`)")
    config.addinivalue_line("markers", "spawn: starts processes (CLI, torchrun, multiprocessing)")
    config.addinivalue_line("markers", "slow: in-process but long (SLOW_TESTS in tests/conftest.py)")
    config.addinivalue_line("markers", "inprocess: runs in the pytest process, quickly (make test-fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        seen: set = set()
        funcs = [getattr(item, "function", None), *_fixture_funcs(item)]
        if (any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in SPAWN_TESTS)
                or any(f is not None and _spawns(f, seen) for f in funcs)):
            item.add_marker(pytest.mark.spawn)
        elif any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        else:
            item.add_marker(pytest.mark.inprocess)


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _launcher_env_restored():
    """In-process code that plays a launcher (export_launcher_env, strip_local_rank_arg) writes
    RANK/LOCAL_RANK/... into os.environ; a value left behind makes a later test think it is
    another rank (lm-eval then returns no results on "rank 3"). Restore them after every test."""
    before = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
