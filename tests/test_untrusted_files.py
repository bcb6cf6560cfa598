"""Files planted in folders megaponder reads or writes are never trusted (docs/training.md,
docs/evaluation.md "Untrusted files"): no planted code runs, no link makes megaponder write or
load outside the run, and a hostile YAML fails in one line within seconds.

Each test plants what an attacker with write access to a shared data/run folder could, and
checks both that megaponder refuses or ignores it and that nothing outside changed (a marker
file the planted code would write, a victim file a link points to)."""
import json
import os
import subprocess
import sys

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
