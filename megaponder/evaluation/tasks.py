"""Offline lm-eval tasks built from the demo corpus's validation split (no hub download).

Two tasks, written as lm-eval task YAMLs over local jsonl files by :func:`write_offline_tasks`:

* ``megaponder_kjv_cloze`` — LAMBADA-style last-word prediction (``output_type:
  loglikelihood``, metrics ``acc`` = the target word is the greedy continuation, and
  ``perplexity`` of the target). Every validation paragraph whose last word is alphabetic
  gives one item: context = up to ``CLOZE_CONTEXT_WORDS`` words before it, target = the word.
* ``megaponder_kjv_mc4`` — 4-way multiple choice (``output_type: multiple_choice``, metrics
  ``acc`` and ``acc_norm``), HellaSwag-shaped: context = the first ``MC_CONTEXT_WORDS`` words
  of a paragraph, choices = its true next ``MC_ENDING_WORDS`` words and the same-length spans
  of three other paragraphs, the gold position drawn with a fixed seed.

The validation split is the demo corpus's (every 20th KJV chapter, megaponder/data/demo.py),
so a model trained on ``data/demo/train_*`` has never seen these passages. Everything is a pure
function of that jsonl and ``SEED``: the same files come out on every machine, so scores are
comparable across runs. ``megaponder lm-eval`` calls :func:`offline_task_dir` whenever a
requested task is one of ``OFFLINE_TASKS`` (building the demo corpus first if it is missing):
the task files are written to a fresh private temp folder for that run only, which is what
goes on lm-eval's include path; nothing under the demo folder is ever an include path.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import string
import tempfile
from typing import Iterator, Optional

OFFLINE_TASKS = ("megaponder_kjv_cloze", "megaponder_kjv_mc4")
SEED = 1234
CLOZE_CONTEXT_WORDS = 48
CLOZE_MIN_WORDS = 12
MC_CONTEXT_WORDS = 16
MC_ENDING_WORDS = 8

# both tasks read their items the same way (one local jsonl as the test split); ``_YAML`` is
# the rest of each task file, written as is (no format fields)
_HEADER = """\
# written by megaponder/evaluation/tasks.py from {source}; do not edit
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
{cache}  data_files:
    test: {data}
test_split: test
"""

_YAML = {
    "megaponder_kjv_cloze": """\
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
should_decontaminate: true
doc_to_decontamination_query: "{{context}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "megaponder_kjv_mc4": """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def _paragraphs(validation_jsonl: str) -> list[list[str]]:
    """Validation paragraphs (one line of a chapter) as word lists, in file order."""
    out = []
    with open(validation_jsonl, encoding="utf-8") as f:
        for row in f:
            for line in json.loads(row)["text"].split("\n"):
                words = line.split()
                if words:
                    out.append(words)
    return out


def cloze_items(paragraphs: list[list[str]]) -> list[dict]:
    items = []
    for words in paragraphs:
        target = words[-1].rstrip(string.punctuation + "’”")
        if len(words) < CLOZE_MIN_WORDS or not target.isalpha():
            continue
        # LAMBADA's passages end right before the target word: no final punctuation to give
        # the end away; the context is capped so items fit a 128-token model
        context = " ".join(words[-1 - CLOZE_CONTEXT_WORDS:-1])
        items.append({"context": context, "target": target})
    return items


def mc_items(paragraphs: list[list[str]], seed: int = SEED) -> list[dict]:
    need = MC_CONTEXT_WORDS + MC_ENDING_WORDS
    usable = [w for w in paragraphs if len(w) >= need]
    endings = [" ".join(w[MC_CONTEXT_WORDS:need]) for w in usable]
    rng = random.Random(seed)
    items = []
    for i, words in enumerate(usable):
        others = rng.sample([j for j in range(len(usable)) if j != i and endings[j] != endings[i]], 3)
        label = rng.randrange(4)
        choices = [endings[j] for j in others]
        choices.insert(label, endings[i])
        items.append({"context": " ".join(words[:MC_CONTEXT_WORDS]), "choices": choices, "label": label})
    return items


def write_offline_tasks(validation_jsonl: str, out_dir: str, dataset_cache_dir: Optional[str] = None) -> str:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` for every offline task into ``out_dir`` (a
    folder the caller names; made if missing); returns ``out_dir``. ``dataset_cache_dir``, when
    given, is where the Hugging Face ``json`` loader keeps its converted copy (by default its
    user cache). Files are written without following links (megaponder/safe_files.py)."""
    from ..safe_files import real_folder, write_atomic

    os.makedirs(out_dir, exist_ok=True)
    real_folder(out_dir, what="task files")
    paragraphs = _paragraphs(validation_jsonl)
    data = {"megaponder_kjv_cloze": cloze_items(paragraphs), "megaponder_kjv_mc4": mc_items(paragraphs)}
    for task, items in data.items():
        jsonl = os.path.abspath(os.path.join(out_dir, f"{task}.jsonl"))
        write_atomic(jsonl, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
        # json.dumps quotes the paths, so any character in them is valid YAML
        cache = "" if dataset_cache_dir is None else f"  cache_dir: {json.dumps(os.path.abspath(dataset_cache_dir))}\n"
        write_atomic(os.path.join(out_dir, f"{task}.yaml"),
                     _HEADER.format(task=task, data=json.dumps(jsonl), cache=cache,
                                    source=json.dumps(os.path.abspath(validation_jsonl))) + _YAML[task])
    return out_dir


def demo_validation(demo_dir: str = "data/demo", log=print) -> str:
    """``<demo_dir>/validation.jsonl``, preparing the demo corpus there first when it is
    missing (an existing corpus is reused as is)."""
    validation = os.path.join(demo_dir, "validation.jsonl")
    if not os.path.isfile(validation):
        from ..data.demo import prepare_demo_corpus
        prepare_demo_corpus(demo_dir, log=log)
    return validation


@contextlib.contextmanager
def offline_task_dir(demo_dir: str = "data/demo", log=print) -> Iterator[str]:
    """A fresh private folder (``mkdtemp``: mode 0700, a random name) holding the offline
    tasks built from ``demo_dir``'s validation split, removed on exit. Pass it to lm-eval as
    an include path: lm-eval reads *every* YAML of an include path and imports the Python
    its ``!function`` tags name, so only a folder nobody else can write is safe to include;
    ``demo_dir`` itself is only read (its ``validation.jsonl``), never included. The Hugging
    Face ``json`` loader's converted copy goes into the same folder, so repeated runs leave
    nothing behind in the user's datasets cache."""
    validation = demo_validation(demo_dir, log=log)
    folder = tempfile.mkdtemp(prefix="megaponder-lm-eval-tasks-")
    try:
        yield write_offline_tasks(validation, folder, dataset_cache_dir=os.path.join(folder, "hf_datasets"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
