"""Arguments of ``megaponder lm-eval`` (kept apart from harness.py, which imports lm_eval, so
``megaponder --help`` works without the ``eval`` extra). Names and meanings follow lm-eval's
own CLI (``lm_eval --tasks ... --num_fewshot ...``); dashes are accepted too."""
from __future__ import annotations

import argparse


def add_lm_eval_arguments(p: argparse.ArgumentParser) -> None:
    def arg(name, **kw):
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)

    arg("checkpoint", required=True, help="run dir or checkpoint folder (any family, any saved tp/pp)")
    arg("tasks", required=True,
        help="comma-separated lm-eval tasks, groups or tags; offline: megaponder_kjv_cloze, megaponder_kjv_mc4")
    arg("include_path", default=None, help="extra folder(s) of task YAMLs, comma-separated")
    arg("limit", default=None, help="items per task (a value < 1 is a fraction of each task)")
    arg("num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    arg("batch_size", default="1", help="requests per forward: an int, or 'auto' (picked from the memory: "
                                       "megaponder/evaluation/batch_size.py)")
    arg("output_path", default=None, help="write lm-eval's results JSON (and --log_samples) here")
    arg("device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    arg("seed", type=int, default=0, help="python/numpy/torch/few-shot seeds and sampled generation")
    arg("log_samples", action="store_true", help="keep every sample's inputs and answers (with --output_path)")
    arg("gen_kwargs", default=None, help="generation arguments for generate_until tasks, e.g. temperature=0")
    arg("bootstrap_iters", type=int, default=100000, help="bootstrap resamples for stderr (0: none)")
    arg("max_length", type=int, default=None, help="longest input (default: max_position_embeddings)")
    arg("tokenizer_model", default=None, help="override the checkpoint's tokenizer")
    arg("demo_dir", default="data/demo",
        help="demo corpus folder the offline tasks are built from (built there when missing)")
    arg("threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
