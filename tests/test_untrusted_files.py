"""Files planted in folders megaponder reads or writes are never trusted (docs/training.md,
docs/evaluation.md "Untrusted files"): no planted code runs, no link makes megaponder write or
load outside the run, and a hostile YAML fails in one line within seconds.

Each test plants what an attacker with write access to a shared data/run folder could, and
checks both that megaponder refuses or ignores it and that nothing outside changed (a marker
file the planted code would write, a victim file a link points to)."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir

TINY_MODEL = dict(family="vanilla", vocab_size=8192, hidden_size=32, num_layers=2, num_heads=2,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A freshly initialised vanilla checkpoint in the saved format (what is tested is which
    files are loaded, not the model's quality)."""
    from megaponder.config import Config, ModelConfig
    from megaponder.models import build_model
    from megaponder.train.checkpoint import write_model_files

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = Config(model=ModelConfig(**TINY_MODEL))
    torch.manual_seed(0)
    write_model_files(str(folder), cfg, build_model(cfg).state_dict(), {"step": 0, "family": "vanilla"},
                      os.path.join(demo_corpus_dir(), "tokenizer.model"))
    return str(folder)


# ---- lm-eval: the offline tasks' folder is never an include path --------------------------
PLANTED_TASK = """\
task: megaponder_kjv_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
process_docs: !function a_evil.process_docs
output_type: loglikelihood
doc_to_text: "{{{{text[:50]}}}}"
doc_to_target: " the"
metric_list:
  - metric: acc
"""
PLANTED_MODULE = """\
import pathlib
pathlib.Path({marker!r}).write_text("planted code ran")


def process_docs(dataset):
    return dataset
"""


def _plant_tasks(folder, marker, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a_evil.yaml"), "w") as f:  # sorts before megaponder_*.yaml
        f.write(PLANTED_TASK.format(data=json.dumps(data)))
    with open(os.path.join(folder, "a_evil.py"), "w") as f:
        f.write(PLANTED_MODULE.format(marker=str(marker)))


def test_lm_eval_never_includes_the_demo_folder(tiny_checkpoint, tmp_path, capsys):
    """A task YAML + module planted in <demo_dir>/lm_eval_tasks/ (where earlier versions wrote
    the offline tasks and included them) and in <demo_dir> itself: `megaponder lm-eval` scores
    its own task, the planted Python never runs; nothing is written into the demo folder."""
    pytest.importorskip("lm_eval")
    from megaponder.cli import main

    demo = tmp_path / "demo"
    demo.mkdir()
    validation = demo / "validation.jsonl"
    validation.write_text(open(os.path.join(demo_corpus_dir(), "validation.jsonl")).read())
    marker = tmp_path / "MARKER"
    planted = demo / "lm_eval_tasks"
    _plant_tasks(str(planted), marker, str(validation))
    _plant_tasks(str(demo), marker, str(validation))
    before = sorted(os.listdir(demo)), sorted(os.listdir(planted))

    args = ["lm-eval", "--checkpoint", tiny_checkpoint, "--tasks", "megaponder_kjv_cloze", "--limit", "2",
            "--batch_size", "2", "--bootstrap_iters", "0", "--demo_dir", str(demo)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "a_evil" not in out.out + out.err
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["tasks"]["megaponder_kjv_cloze"]["acc,none"] is not None
    assert not marker.exists()
    assert (sorted(os.listdir(demo)), sorted(os.listdir(planted))) == before  # nothing written there

    # the plant is real: with that folder on an include path (what earlier versions did, or
    # the user's explicit --include_path), lm-eval imports the planted module
    from lm_eval.tasks import TaskManager, get_task_dict
    get_task_dict(["megaponder_kjv_cloze"], TaskManager(include_path=str(planted), include_defaults=False))
    assert marker.read_text() == "planted code ran"


def test_offline_task_folder_is_private_and_removed(tmp_path):
    from megaponder.evaluation.tasks import OFFLINE_TASKS, offline_task_dir

    with offline_task_dir(demo_corpus_dir(), log=lambda *a: None) as folder:
        assert os.stat(folder).st_mode & 0o777 == 0o700
        assert sorted(os.listdir(folder)) == sorted(f"{t}.{ext}" for t in OFFLINE_TASKS for ext in ("jsonl", "yaml"))
        text = open(os.path.join(folder, "megaponder_kjv_cloze.yaml")).read()
        assert json.dumps(os.path.join(folder, "hf_datasets")) in text  # the datasets copy goes there too
    assert not os.path.exists(folder)


# ---- run dirs: links planted under names megaponder writes or reads ------------------------
def _tree_digest(root) -> dict:
    """relative path -> bytes of every file below ``root`` (links followed: what they hold)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _train(run_dir, *extra):
    from test_train import train

    return train(run_dir, demo_corpus_dir(), "train.steps=2", "train.save_every=2", "train.eval_every=0",
                 "model.hidden_size=32", "model.num_heads=2", *extra, check=False)


def _one_line_refusal(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megaponder:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A 2-step training into a run dir where config.yml, metrics.jsonl, wandb_id and a staging
    folder name are links to files/folders outside the run: the run completes, replacing or
    removing each link, and writes nothing through them."""
    base = tmp_path_factory.mktemp("planted")
    outside, run = base / "outside", base / "run"
    (outside / "stage").mkdir(parents=True)
    for name in ("config.yml", "metrics.jsonl", "wandb_id"):
        (outside / name).write_text(f"precious {name}\n")
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        os.symlink(outside / name, run / name)
    os.symlink(outside / "stage", run / "checkpoints" / ".tmp-global_step2")
    before = _tree_digest(outside)
    proc = _train(run, "train.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, outside, before


def test_training_never_writes_through_planted_links(planted_run):
    run, outside, before = planted_run
    assert _tree_digest(outside) == before  # nothing outside changed
    for name in ("config.yml", "metrics.jsonl"):
        assert not os.path.islink(run / name) and (run / name).stat().st_size > 0
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"loss"' in line] == [1, 2]
    assert not os.path.lexists(run / "checkpoints" / ".tmp-global_step2")
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step2"


def test_lock_link_is_refused_and_its_target_untouched(planted_run, tmp_path):
    """RunDirLock used to open `.lock` with O_CREAT|O_RDWR and truncate what a link there
    points to; now the link is refused in one line, also through `megaponder train`."""
    from megaponder.safe_files import UnsafePath
    from megaponder.train.runlock import RunDirLock

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    shutil.copytree(planted_run[0], run, symlinks=True)
    victim.write_text("precious\n")
    os.unlink(run / ".lock")  # the training's own
    os.symlink(victim, run / ".lock")
    with pytest.raises(UnsafePath, match="symbolic link"):
        RunDirLock(str(run)).acquire()
    _one_line_refusal(_train(run, "train.resume=auto"), ".lock", "symbolic link")
    assert victim.read_text() == "precious\n"
    os.unlink(run / ".lock")  # a real lock file is fine
    os.mkfifo(run / ".lock")  # a FIFO must not hang the open
    with pytest.raises(UnsafePath, match="not a regular file"):
        RunDirLock(str(run)).acquire()


def _resume_refusal(run, root) -> str:
    """What the trainer's resume (claim_run_dir, then verify_checkpoint of the candidates)
    refuses, in process; '' when it would resume."""
    from megaponder.train import checkpoint as ckpt
    from megaponder.train.runlock import claim_run_dir

    try:
        lock, _, _ = claim_run_dir(str(run), str(root), "auto", False)
    except ckpt.CheckpointError as err:
        return str(err)
    lock.release()
    for folder in ckpt.resume_candidates(str(root)):
        problem = ckpt.verify_checkpoint(folder)
        if problem:
            assert problem.startswith(ckpt.UNSAFE), problem  # refused, not skipped as damaged
            return problem
    return ""


@pytest.mark.parametrize("plant", ["linked_tag", "linked_root", "renamed_tag", "link_inside"])
def test_checkpoints_only_from_real_folders_of_the_run(plant, planted_run, tmp_path):
    """A tag that is a link (no `latest`: resume would pick it), a `checkpoints/` that is a
    link, a tag whose meta.json step differs from its name, a link inside a tag: resume
    (claim_run_dir, what `megaponder train` runs first) and loading from the run dir refuse in
    one line; nothing outside the run is read for training or changed."""
    from megaponder.train import checkpoint as ckpt

    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(planted_run[0], run, symlinks=True)
    outside.mkdir()
    root = run / "checkpoints"
    if plant == "linked_tag":
        os.replace(root / "global_step2", outside / "global_step50")
        os.symlink(outside / "global_step50", root / "global_step50")
        os.unlink(root / "latest")
        expect = "link out of the run"
    elif plant == "linked_root":
        os.replace(root, outside / "checkpoints")
        os.symlink(outside / "checkpoints", root)
        expect = "link out of the run"
    elif plant == "renamed_tag":
        os.replace(root / "global_step2", root / "global_step50")
        (root / "latest").write_text("global_step50\n")
        expect = "says step 2"
    else:
        os.replace(root / "global_step2" / "model.pt", outside / "model.pt")
        os.symlink(outside / "model.pt", root / "global_step2" / "model.pt")
        expect = "is a link"
    before = _tree_digest(outside)
    assert expect in _resume_refusal(run, root)
    if plant == "linked_tag":  # no `latest`: loading finds nothing (it never searches tags)
        with pytest.raises(FileNotFoundError, match="checkpoints/latest"):
            ckpt.load_model(str(run))
        (root / "latest").write_text("global_step50\n")
    with pytest.raises(ckpt.CheckpointError, match=expect):
        ckpt.load_model(str(run))
    if plant == "linked_tag":
        os.unlink(root / "latest")
    line = _one_line_refusal(_train(run, "train.resume=auto"), expect)
    assert str(outside) in line or "global_step" in line
    assert _tree_digest(outside) == before


# ---- YAML: alias bombs and huge values -----------------------------------------------------
def _bomb_text() -> str:
    """The "billion laughs" document under a real key: 9 nested lists of 9 aliases (9^9
    leaves once expanded), under 1 KB; the error for it used to format the whole value."""
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "train:\n  steps: [" + ",\n    ".join(levels) + "]\n"


def _limited(cmd, seconds=60):
    """``cmd`` with a 4 GB address-space limit (RLIMIT_AS), as a user's small VM would have."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, preexec_fn=limit, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    return proc, time.monotonic() - start


def test_alias_bomb_config_fails_in_one_line_within_seconds(tmp_path):
    from megaponder.config import ConfigError, load_config
    from megaponder.config.yaml_io import parse_yaml

    text = _bomb_text()
    assert len(text.encode()) < 1024
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than") as err:
        parse_yaml(text, "bomb.yml")
    assert time.monotonic() - start < 1.0 and "\n" not in str(err.value) and len(str(err.value)) < 400
    # --set takes YAML too: a flow-style bomb in one value
    flow = "[" + ", ".join(["&b0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(None, [f"data.path={flow}"], check_paths=False)
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        parse_yaml("a: &a [1, *a]\n", "self.yml")
    # anchors within the budget are still YAML: merge keys and shared values work
    assert parse_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "ok.yml")["other"] == {"x": 1, "y": 2}

    config = tmp_path / "bomb.yml"
    config.write_text(text)
    proc, seconds = _limited([sys.executable, "-m", "megaponder", "train", "--config", str(config)])
    line = _one_line_refusal(proc, "bomb.yml", "expands to more than")
    assert len(line) < 400 and seconds < 30, (seconds, line)


def test_alias_bomb_in_a_checkpoint_config_fails_in_one_line(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "config.yml").write_text(_bomb_text())
    proc, seconds = _limited([sys.executable, "-m", "megaponder", "generate", "--checkpoint", str(folder),
                              "--prompt", "In the beginning", "--max-new-tokens", "2"])
    line = _one_line_refusal(proc, "config.yml", "expands to more than")
    assert len(line) < 400 and seconds < 30, (seconds, line)


def test_other_yaml_readers_share_the_limits(tmp_path):
    """A GPT-NeoX config (convert's --config) goes through the same reader; a config file
    over 16 MB is refused before it is read whole."""
    from megaponder.config import ConfigError, load_config
    from megaponder.convert.neox_native import read_neox_config

    bomb = tmp_path / "neox.yml"
    bomb.write_text(_bomb_text())
    with pytest.raises(ConfigError, match="expands to more than"):
        read_neox_config(str(bomb))
    huge = tmp_path / "huge.yml"
    huge.write_text("# " + "x" * (17 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 16 MB"):
        load_config(str(huge), check_paths=False)


def test_hf_folder_code_is_never_imported(tmp_path):
    """A Hugging Face folder given to `convert_checkpoint.py --from hf` whose config.json asks
    for its own Python (auto_map) is read without trust_remote_code: the module never runs."""
    from megaponder.convert.checkpoint import _load_hf

    marker = tmp_path / "MARKER"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (hf / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(Exception) as err:
        _load_hf(str(hf))
    assert "trust_remote_code" in str(err.value) or "evil" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["x" * 100_000, list(range(5000)), {"k%d" % i: i for i in range(1000)}])
def test_errors_quote_a_short_prefix_of_a_value(value, tmp_path):
    import yaml

    from megaponder.config import ConfigError, load_config

    for key in ("train.steps", "model.family", "train.resume", "optim.lr"):
        section, name = key.split(".")
        path = tmp_path / "c.yml"
        path.write_text(yaml.safe_dump({section: {name: value}}))
        with pytest.raises(ConfigError) as err:
            load_config(str(path), check_paths=False)
        assert len(str(err.value)) < 400 and key in str(err.value), str(err.value)[:500]


# ---- index caches: data to check, never to trust -------------------------------------------
class _Planted:
    """Unpickling this writes the marker: what a pickled "index" could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _gpt_dataset(cache):
    from megaponder.data import IndexedDataset
    from megaponder.data.gpt_dataset import GPTDataset

    ds = IndexedDataset(os.path.join(demo_corpus_dir(), "validation_text_document"))
    return GPTDataset(ds, np.arange(len(ds), dtype=np.int32), 40, 16, 1, cache_dir=str(cache))


def _damage(kind, path, marker):
    import pickle

    arr = np.load(path)
    if kind == "pickled_npy":  # a valid .npy holding an object array (np.save pickles it)
        np.save(path, np.array([_Planted(marker)] * 3, dtype=object), allow_pickle=True)
    elif kind == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump(_Planted(marker), f)
    elif kind == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "out_of_range":
        np.save(path, arr + 10 ** 6)
    elif kind == "float":
        np.save(path, arr.astype(np.float64))
    elif kind == "wrong_shape":
        np.save(path, arr.reshape(-1)[:-1] if arr.ndim == 2 else arr[:-1])


@pytest.mark.parametrize("kind", ["pickled_npy", "raw_pickle", "truncated", "out_of_range", "float", "wrong_shape"])
@pytest.mark.parametrize("part", ["doc_idx", "sample_idx", "shuffle_idx"])
def test_damaged_index_cache_is_detected_and_rebuilt(kind, part, tmp_path, monkeypatch):
    # the warning is collected by a handler on the module's own logger: what ran earlier in the
    # session (library logging set-up: levels, propagation, disabled loggers) cannot hide it
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("megaponder.data.index_cache")
    monkeypatch.setattr(log, "disabled", False)
    monkeypatch.setattr(log, "level", logging.WARNING)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    logging.root.manager._clear_cache()  # isEnabledFor caches the verdicts of the old settings
    log.addHandler(handler)
    marker = tmp_path / "MARKER"
    cache = tmp_path / "cache"
    clean = _gpt_dataset(cache)
    want = [np.array(a) for a in (clean.doc_idx, clean.sample_idx, clean.shuffle_idx)]
    path = clean.cache_paths[part]
    del clean
    _damage(kind, path, str(marker))
    try:
        again = _gpt_dataset(cache)
        lines = [r.getMessage() for r in records if "index cache" in r.getMessage()]
        records.clear()
        _gpt_dataset(cache)  # the rebuilt entry is a clean hit: no line
        lines_after_rebuild = [r.getMessage() for r in records if "index cache" in r.getMessage()]
    finally:
        log.removeHandler(handler)
    entry = path.rsplit("-", 1)[0]  # <cache>/<hash>-train: the line names a file of this entry
    assert len(lines) == 1 and entry in lines[0] and "rebuilding" in lines[0] and "\n" not in lines[0]
    for a, b in zip(want, (again.doc_idx, again.sample_idx, again.shuffle_idx)):
        np.testing.assert_array_equal(a, b)
    assert not marker.exists()
    assert not lines_after_rebuild


def test_index_cache_never_writes_through_a_link(tmp_path):
    """Links planted at the cache file names (before the first build) are replaced, not
    written through; the files they point to are untouched."""
    from megaponder.data import index_cache

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    probe = _gpt_dataset(tmp_path / "probe")  # only to learn the entry's file names
    for key, path in probe.cache_paths.items():
        victim = outside / key
        victim.write_text("precious\n")
        os.symlink(victim, cache / os.path.basename(path))
    g = _gpt_dataset(cache)
    assert all(not os.path.islink(p) for p in g.cache_paths.values())
    assert all((outside / key).read_text() == "precious\n" for key in probe.cache_paths)
    assert index_cache.load(g.cache_paths, g.description) is not None


# ---- data and export folders ---------------------------------------------------------------
def test_dataset_writer_refuses_links_and_replaces_index_links(tmp_path):
    """Preprocessing writes through IndexedDatasetBuilder: a link planted at the output .bin
    is refused in one line; one at the .idx (written last, by rename) is replaced."""
    from megaponder.data import IndexedDataset, IndexedDatasetBuilder
    from megaponder.safe_files import UnsafePath

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    prefix = tmp_path / "out_text_document"
    os.symlink(victim, f"{prefix}.bin")
    with pytest.raises(UnsafePath, match="symbolic link") as err:
        IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    assert "\n" not in str(err.value)
    os.unlink(f"{prefix}.bin")
    os.symlink(victim, f"{prefix}.idx")
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    b.add_document([1, 2, 3], [3])
    b.finalize(f"{prefix}.idx")
    assert victim.read_text() == "precious\n" and not os.path.islink(f"{prefix}.idx")
    assert IndexedDataset(str(prefix))[0].tolist() == [1, 2, 3]


def test_hf_export_never_writes_through_planted_links(tiny_checkpoint, tmp_path):
    """save_pretrained opens its files by name; the export writes into a private staging
    folder and renames the files into --output, so links planted there are replaced."""
    from megaponder.convert.hf_export import export_checkpoint

    out, outside = tmp_path / "hf", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (outside / name).write_text("precious\n")
        os.symlink(outside / name, out / name)
    export_checkpoint(tiny_checkpoint, str(out))
    assert all((outside / n).read_text() == "precious\n" for n in os.listdir(outside))
    assert not any(os.path.islink(out / n) for n in os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(out) if n.startswith(".megaponder-staging")]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(out))  # a complete, loadable export
