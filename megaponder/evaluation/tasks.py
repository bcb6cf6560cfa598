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
comparable across runs. ``megaponder lm-eval`` calls :func:`ensure_offline_tasks` whenever a
requested task is one of ``OFFLINE_TASKS`` (building the demo corpus first if it is missing)
and adds the folder to lm-eval's include path.
"""
from __future__ import annotations

import json
import os
import random
import string

OFFLINE_TASKS = ("megaponder_kjv_cloze", "megaponder_kjv_mc4")
TASKS_SUBDIR = "lm_eval_tasks"
SEED = 1234
CLOZE_CONTEXT_WORDS = 48
CLOZE_MIN_WORDS = 12
MC_CONTEXT_WORDS = 16
MC_ENDING_WORDS = 8

# both tasks read their items the same way (one local jsonl as the test split); ``_YAML`` is
# the rest of each task file, written as is (no format fields)
_HEADER = """\
# written by megaponder/evaluation/tasks.py from {source}; do not edit (rewritten on every run)
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
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


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # a concurrent reader sees the old or the new file, never half


def write_offline_tasks(validation_jsonl: str, out_dir: str) -> str:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` for every offline task into ``out_dir``;
    returns ``out_dir`` (pass it to lm-eval as ``--include_path``)."""
    os.makedirs(out_dir, exist_ok=True)
    paragraphs = _paragraphs(validation_jsonl)
    data = {"megaponder_kjv_cloze": cloze_items(paragraphs), "megaponder_kjv_mc4": mc_items(paragraphs)}
    for task, items in data.items():
        jsonl = os.path.abspath(os.path.join(out_dir, f"{task}.jsonl"))
        _write(jsonl, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
        # json.dumps quotes the path, so any character in it is valid YAML
        _write(os.path.join(out_dir, f"{task}.yaml"),
               _HEADER.format(task=task, data=json.dumps(jsonl), source=os.path.abspath(validation_jsonl))
               + _YAML[task])
    return out_dir


def ensure_offline_tasks(demo_dir: str = "data/demo", log=print) -> str:
    """The offline task folder under ``demo_dir`` (the demo corpus is built there first if its
    validation split is missing; an existing corpus is reused as is)."""
    validation = os.path.join(demo_dir, "validation.jsonl")
    if not os.path.isfile(validation):
        from ..data.demo import prepare_demo_corpus
        prepare_demo_corpus(demo_dir, log=log)
    return write_offline_tasks(validation, os.path.join(demo_dir, TASKS_SUBDIR))
