"""``megaponder compare`` on two real tiny runs (vanilla and PonderLM, 2 steps each)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from test_first_hour_errors import _run, _sets

CONFIGS = os.path.join(REPO_ROOT, "examples", "configs")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    runs = {}
    for name in ("tiny", "tiny-ponderlm"):
        run_dir = root / name
        proc = _run([sys.executable, "-m", "megaponder", "train", "--config",
                     os.path.join(CONFIGS, name + ".yml"), *_sets(run_dir, "train.steps=2")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run_dir
    return runs


def _final_row(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return next(r for r in reversed(rows) if "val_ppl" in r)


def test_compare_prints_one_table_and_writes_a_plot(two_runs, tmp_path):
    plot = tmp_path / "cmp.png"
    proc = _run([sys.executable, "-m", "megaponder", "compare", str(two_runs["tiny"]),
                 str(two_runs["tiny-ponderlm"]), "--plot", str(plot)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["run", "family", "steps", "tokens", "ppl", "mean_iters",
                                "flops_ratio", "scored", "on"]
    assert len(lines) == 4  # header, rule, two runs; same validation data: no footnote
    for line, name, family in ((lines[2], "tiny", "vanilla"), (lines[3], "tiny-ponderlm", "ponderlm")):
        final = _final_row(two_runs[name])
        cells = line.split()
        assert cells[:4] == [str(two_runs[name]), family, "2", f"{final['tokens']:,}"]
        assert cells[4:7] == [f"{final['val_ppl']:.2f}", f"{final['val_mean_iters']:.3f}",
                              f"{final['val_flops_ratio']:.3f}"]
    assert float(lines[3].split()[5]) == 4.0 and float(lines[2].split()[5]) == 1.0  # K=3: 4 passes
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_compare_on_the_same_data_and_refusals(two_runs, tmp_path):
    from conftest_data import demo_corpus_dir
    from megaponder.analysis.compare import compare

    data = os.path.join(demo_corpus_dir(), "validation_text_document")
    rows = json.loads(compare([str(two_runs["tiny"]), str(two_runs["tiny-ponderlm"])], data=data,
                              max_samples=4, as_json=True))
    # the same windows as `megaponder eval` scores
    for row in rows:
        proc = _run([sys.executable, "-m", "megaponder", "eval", "--checkpoint", row["run"],
                     "--data", data, "--max-samples", "4", "--device", "cpu"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
    # a run dir without metrics: one line, exit 2
    proc = _run([sys.executable, "-m", "megaponder", "compare", str(tmp_path)])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"megaponder: {tmp_path} is not a run dir (no metrics.jsonl); pass the train.run_dir of "
        f"finished or running runs.")


def test_eval_says_what_it_scores_and_shows_a_bar_only_when_asked(two_runs):
    from conftest_data import demo_corpus_dir

    data = os.path.join(demo_corpus_dir(), "validation_text_document")
    base = [sys.executable, "-m", "megaponder", "eval", "--checkpoint", str(two_runs["tiny-ponderlm"]),
            "--data", data, "--max-samples", "6", "--batch-size", "4", "--device", "cpu"]
    quiet, bar = _run(base), _run(base + ["--progress"])
    assert quiet.returncode == bar.returncode == 0, quiet.stderr[-2000:] + bar.stderr[-2000:]
    first = "megaponder eval: 6 windows of 16 tokens from " + data + ", ponderlm model on cpu"
    assert first in quiet.stderr.splitlines() and first in bar.stderr
    assert "\r" not in quiet.stderr and "eval: 100%" in bar.stderr and "2/2" in bar.stderr


def test_lm_eval_auto_batch_size_picks_one_from_memory():
    import torch

    from megaponder.config import load_config
    from megaponder.evaluation import batch_size as bs
    from megaponder.models import build_model

    cfg = load_config(os.path.join(CONFIGS, "tiny-adaponderlm.yml"), check_paths=False)
    model = build_model(cfg)
    per_row = bs.estimated_row_bytes(model, 256)
    picked = bs.pick_batch_size("auto", model, 256, torch.device("cpu"))
    fit = bs._available_memory() // 8 // per_row
    assert picked > 1 and picked & (picked - 1) == 0 and picked <= min(fit, bs.MAX_AUTO_BATCH) < 2 * picked
    assert bs.pick_batch_size("auto:4", model, 10**9, "cpu") == 1   # nothing bigger fits
    assert bs.pick_batch_size("3", model, 256, "cpu") == 3


def _doc_blocks(section_title):
    """The fenced code blocks of one section of docs/evaluation.md, as (language, text)."""
    import re
    text = open(os.path.join(REPO_ROOT, "docs", "evaluation.md")).read()
    section = text.split(section_title, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def test_the_worked_offline_task_example_of_the_docs_runs(two_runs, tmp_path):
    """docs/evaluation.md's own jsonl, YAML and command, on the tiny vanilla run."""
    pytest.importorskip("lm_eval")
    blocks = _doc_blocks("## Your own offline task, from your own jsonl")
    (_, items), (_, task), (_, command) = [b for b in blocks if b[0] in ("json", "yaml", "bash")]
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "capitals.jsonl").write_text(items)
    (tmp_path / "my_tasks" / "my_capitals.yaml").write_text(task)
    args = command.split()
    assert args[:2] == ["megaponder", "lm-eval"] and "runs/quickstart" in args
    args = [str(two_runs["tiny"]) if a == "runs/quickstart" else a for a in args[2:]]
    proc = subprocess.run([sys.executable, "-m", "megaponder", "lm-eval", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
                               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    scores = result["tasks"]["my_capitals"]
    assert 0 <= scores["acc,none"] <= 1 and scores["perplexity,none"] > 1
    assert result["mean_iters"] == 1.0 and "flops_ratio" in result
