"""User errors through the real command line: one line, once, exit code 2, no traceback unless
asked — in one process and under a real 2-process torchrun; YAML errors; plain log lines."""
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir
from dist_utils import free_port

TINY_YML = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")


def _sets(run_dir, *extra):
    demo = demo_corpus_dir()
    sets = [f"train.run_dir={run_dir}", f"data.path=[{demo}/train_text_document]",
            f"data.valid_path=[{demo}/validation_text_document]",
            f"data.tokenizer_model={demo}/tokenizer.model", "train.threads=1", *extra]
    return [a for s in sets for a in ("--set", s)]


def _run(cmd, **env):
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=full_env,
                          timeout=300)


def _ours(stderr):
    return [line for line in stderr.splitlines() if line.startswith("megaponder: ")]


VOCAB_MSG = "model.vocab_size=1000 is smaller than the vocabulary of data.tokenizer_model"


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "megaponder", "train", "--config", TINY_YML,
           *_sets(tmp_path / "run", "model.vocab_size=1000")]
    proc = _run(cmd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(_ours(proc.stderr)) == 1 and VOCAB_MSG in _ours(proc.stderr)[0]
    assert proc.stderr.strip().splitlines()[-1].startswith("megaponder: ")  # the last line
    assert "Traceback" not in proc.stderr
    # --debug: the traceback too (a config error: it fails before the heavy imports, cheaper)
    proc = _run([sys.executable, "-m", "megaponder", "--debug", "train", "--config", TINY_YML,
                 "--set", "model.num_heads=3"])
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("megaponder: Invalid configuration: ")


def test_debug_environment_variable_shows_the_traceback(monkeypatch):
    import io

    from megaponder.errors import DataError, run_reporting_user_errors

    def fail():
        raise DataError("x.bin: bad\n  - first\n  - second")

    for value, traceback_shown in (("1", True), ("0", False)):
        monkeypatch.setenv("MEGAPONDER_DEBUG", value)
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        assert run_reporting_user_errors(fail) == 2
        assert ("Traceback" in err.getvalue()) is traceback_shown
        assert err.getvalue().splitlines()[-1] == "megaponder: x.bin: bad | first | second"


def test_user_error_under_torchrun_is_printed_once_and_is_torchruns_root_cause(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "megaponder", "train", "--config", TINY_YML,
           *_sets(tmp_path / "run", "model.vocab_size=1000")]
    proc = _run(cmd)
    assert proc.returncode != 0
    ours = _ours(proc.stderr)
    assert len(ours) == 1 and VOCAB_MSG in ours[0], proc.stderr[-3000:]
    # torchrun's closing ChildFailedError block shows the message, not "To enable traceback"
    summary = proc.stderr.rsplit("ChildFailedError", 1)[-1]
    assert f"traceback : {ours[0]}" in summary, summary
    # the only traceback is the launcher's own ChildFailedError, none from the ranks
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr[-3000:]


@pytest.mark.parametrize("text, expected", [
    ("model:\n  family: [vanilla\ntrain: {}\n", r"bad.yml:3:6: YAML syntax error: expected ',' or ']'"),
    ("train:\n  steps: 3\n  seed: 1\n  steps: 4\n",
     r"bad.yml:4:3: duplicated key 'steps' \(first at line 2, again at line 4\)"),
    ("train:\n  steps: 3\n\x01\n", r"bad.yml:3:1: YAML syntax error: character #x0001 is not allowed"),
    ("model: {}\ntrain: {steps: 3}\ndata: {}\ntrain: {seed: 2}\n",
     r"bad.yml:4:1: duplicated key 'train' \(first at line 2, again at line 4\)"),
])
def test_yaml_errors_point_at_the_place(tmp_path, text, expected):
    from megaponder.config import ConfigError, load_config
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(str(path), check_paths=False)
    assert "\n" not in str(info.value)


def test_yaml_merge_keys_may_override_without_being_duplicates(tmp_path):
    from megaponder.config import load_config
    path = tmp_path / "ok.yml"
    path.write_text("train:\n  <<: {steps: 3, seed: 1}\n  steps: 5\n")
    cfg = load_config(str(path), check_paths=False)
    assert (cfg.train.steps, cfg.train.seed) == (5, 1)


def test_set_accepts_lists_and_refuses_an_empty_run_dir():
    from megaponder.config import ConfigError, load_config
    cfg = load_config(TINY_YML, ["data.path=[a, b]", "ponder.jacobi_passes=[1,2]",
                                 "data.valid_path=c"], check_paths=False)
    assert cfg.data.path == ["a", "b"] and cfg.ponder.jacobi_passes == [1, 2]
    assert cfg.data.valid_path == ["c"]  # a single value becomes a one-element list
    with pytest.raises(ConfigError, match="train.run_dir is empty"):
        load_config(TINY_YML, ["train.run_dir="], check_paths=False)
    with pytest.raises(ConfigError, match=r"--set data.path:1:5: YAML syntax error"):
        load_config(TINY_YML, ["data.path=[a,b"], check_paths=False)


# `megaponder train` through main(), then whether it left its process group behind
TRAIN_THEN_GROUP = ("import sys, torch.distributed as dist\n"
                    "from megaponder.cli import main\n"
                    "rc = main(sys.argv[1:])\n"
                    "print('process group left:', dist.is_initialized())\n"
                    "sys.exit(rc)\n")


def test_progress_bar_off_prints_plain_log_lines(tmp_path):
    """Plain log lines; and the command tears its process group down before the interpreter
    exits (a gloo group left to shutdown can abort a clean exit, megaponder/cli.py)."""
    proc = _run([sys.executable, "-c", TRAIN_THEN_GROUP, "train", "--config", TINY_YML,
                 *_sets(tmp_path / "run", "train.progress_bar=false", "train.steps=2",
                        "train.log_every=1", "model.hidden_size=32", "model.num_layers=1",
                        "data.seq_length=16", "train.micro_batch_size=2", "train.eval_batches=1")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[megaponder] step ")]
    assert [l.split(" | ")[0] for l in lines] == ["[megaponder] step 1/2", "[megaponder] step 2/2"]
    assert all(" | loss " in l and " | lr " in l for l in lines)
    assert "\r" not in proc.stdout + proc.stderr  # no progress-bar redraws in a batch log
    assert proc.stdout.splitlines()[-1] == "process group left: False"


def test_tp_that_cannot_split_the_padded_vocabulary_is_refused():
    """The padded vocabulary does not depend on tp (checkpoints move between layouts), so a tp
    that does not divide it is an error naming both keys, as docs/config.md says."""
    from megaponder.config import ConfigError, load_config
    base = ["model.vocab_size=1000", "model.num_heads=4", "model.hidden_size=64"]
    cfg = load_config(TINY_YML, base + ["model.make_vocab_size_divisible_by=8", "parallel.tp=2"],
                      check_paths=False)
    assert cfg.model.padded_vocab() == 1000  # not rounded up to 8 x tp = 16
    with pytest.raises(ConfigError, match=r"padded vocabulary 1000 does not split into 16 equal "
                                          r"shards \(parallel.tp\); set model.padded_vocab_size"):
        load_config(TINY_YML, base + ["model.make_vocab_size_divisible_by=8", "parallel.tp=16",
                                      "model.num_heads=16"], check_paths=False)


HELP_PROBE = """
import contextlib, io, json, sys
from megaponder.cli import main
codes, texts = [], []
for argv in {argvs!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
        except SystemExit as stop:
            codes.append(stop.code)
    texts.append(out.getvalue())
print(json.dumps({{"codes": codes, "texts": texts,
                   "heavy": sorted(m for m in ("torch", "deepspeed", "transformers") if m in sys.modules)}}))
"""


def test_help_and_usage_errors_do_not_import_torch():
    """`megaponder --help`, every subcommand's --help and argument errors answer without
    importing torch (seconds saved on every typo); the help still lists every subcommand."""
    import json

    helps = [["--help"]] + [[c, "--help"] for c in ("train", "generate", "eval", "lm-eval",
                                                     "fprinciple", "plan", "compare")]
    helps.append(["fprinciple", "lm", "--help"])
    errors = [[], ["train"], ["no-such-command"], ["plan", "--world-size", "two"]]
    probe = HELP_PROBE.format(argvs=helps + errors)
    out = _run([sys.executable, "-c", probe])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["heavy"] == [], got["heavy"]
    assert got["codes"] == [0] * len(helps) + [2] * len(errors)
    for command in ("train", "generate", "eval", "lm-eval", "fprinciple", "plan", "compare"):
        assert command in got["texts"][0]
    assert "--world-size" in got["texts"][helps.index(["plan", "--help"])]
    assert "--probes" in got["texts"][helps.index(["fprinciple", "lm", "--help"])]
