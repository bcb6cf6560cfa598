"""A family added as one new file of megaponder/models/ (plus its one line in the family table,
models/args.py FAMILY_MODULES) trains, decodes, reports FLOPs and exports to Hugging Face with
no other edit.

The package is copied to a temp dir, ``models/twice.py`` (a copy of tests/twice_family.py: the
stack run twice, a fixed depth of 2) and its table line are added there, and a subprocess
running that copy trains it with ``megaponder train`` (3 steps), decodes with ``megaponder
generate``, counts its FLOPs and exports it. A second subprocess, where megaponder cannot be
imported, loads the export with ``trust_remote_code`` and must give the copy's logits and
greedy tokens. Every .py of the export is a byte copy of a file of the copied models/ except the
two generated entry points.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir

pytest.importorskip("transformers")

TABLE_END = '    "random_halting": ".baselines",\n}'

#: the family's one file (also loaded in-process by test_family_spec.py)
FAMILY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "twice_family.py")

# runs the copied package (PYTHONPATH): train, generate, FLOPs, export, reference logits
MEGAPONDER_SIDE = textwrap.dedent(r'''
    import contextlib, io, json, sys
    import megaponder, torch
    root, demo, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
    assert megaponder.__file__.startswith(root), megaponder.__file__
    from megaponder.cli import main
    from megaponder.convert.hf_export import export_checkpoint
    from megaponder.models import flops
    from megaponder.train.checkpoint import load_model

    run = f"{root}/run"
    sets = ["model.family=twice", "model.hidden_size=32", "model.num_heads=2",
            "model.max_position_embeddings=64", "data.seq_length=32", "train.micro_batch_size=2",
            "train.steps=3", "train.log_every=1", "train.eval_every=0", f"train.run_dir={run}",
            f"data.path=[{demo}/train_text_document]", "data.valid_path=[]",
            f"data.tokenizer_model={demo}/tokenizer.model"]
    assert main(["train", "--config", tiny] + [a for s in sets for a in ("--set", s)]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", "--checkpoint", run, "--prompt", "In the beginning", "--ids",
                     "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    ids = json.loads(out.getvalue())
    model = load_model(run).eval()
    vanilla = flops.Dims(**{**flops.Dims.of(model).__dict__, "family": "vanilla"})
    ratio = flops.inference_flops(model, 16) / flops.inference_flops(vanilla, 16)
    assert export_checkpoint(run, f"{root}/hf") == "MegaponderForCausalLM"
    torch.save({"ids": torch.tensor([ids]), "logits": model(torch.tensor([ids])).logits,
                "flops_ratio": ratio, "prompt_len": len(ids) - 4,
                "steps": [json.loads(l)["step"] for l in open(f"{run}/metrics.jsonl") if '"loss"' in l]},
               f"{root}/ref.pt")
''')

# megaponder is not importable here (python -I, no PYTHONPATH): the export alone
HF_SIDE = textwrap.dedent(r'''
    import importlib.util, json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    assert importlib.util.find_spec("megaponder") is None, "megaponder is importable"
    import torch
    from transformers import AutoModelForCausalLM
    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    model = AutoModelForCausalLM.from_pretrained(f"{root}/hf", trust_remote_code=True)
    n = ref["prompt_len"]
    out = model.generate(ref["ids"][:, :n], max_new_tokens=4, do_sample=False)
    json.dump({"class": type(model).__name__, "family": model.config.family,
               "logit_diff": (model(ref["ids"]).logits - ref["logits"]).abs().max().item(),
               "tokens_equal": out.tolist() == ref["ids"].tolist(),
               "iterations": model.last_generation_iterations}, open(f"{root}/hf.json", "w"))
''')


def _run(args, env, cwd):
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_family_in_one_new_file_trains_decodes_counts_flops_and_exports(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(REPO_ROOT, "megaponder"), pkg / "megaponder",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    models = pkg / "megaponder" / "models"
    shutil.copy(FAMILY_FILE, models / "twice.py")
    args = (models / "args.py").read_text()
    assert TABLE_END in args
    (models / "args.py").write_text(args.replace(TABLE_END, '    "random_halting": ".baselines",\n'
                                                            '    "twice": ".twice",\n}'))
    for name, text in (("megaponder_side.py", MEGAPONDER_SIDE), ("hf_side.py", HF_SIDE)):
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    tiny = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")
    _run([str(tmp_path / "megaponder_side.py"), str(pkg), demo_corpus_dir(), tiny],
         {**env, "PYTHONPATH": str(pkg)}, tmp_path)
    _run(["-I", str(tmp_path / "hf_side.py"), str(pkg)], env, tmp_path)

    import torch

    ref = torch.load(pkg / "ref.pt")
    assert ref["steps"] == [1, 2, 3], ref["steps"]                # trained
    assert 1.0 < ref["flops_ratio"] < 2.0, ref["flops_ratio"]     # two stack passes, one head
    got = json.loads((pkg / "hf.json").read_text())
    assert got["class"] == "MegaponderForCausalLM" and got["family"] == "twice"
    assert got["logit_diff"] <= 1e-5, got["logit_diff"]           # fp32, the same code
    assert got["tokens_equal"], "the export's greedy tokens differ from megaponder generate"
    assert got["iterations"] == [[2.0] * 4]
    # every .py of the export is a byte copy of the copied models/ but the entry points
    export = pkg / "hf"
    code = sorted(f for f in os.listdir(export) if f.endswith(".py"))
    assert "twice.py" in code
    glue = {"configuration_megaponder.py", "modeling_megaponder.py"}
    for name in code:
        if name in glue:
            assert len((export / name).read_text().splitlines()) <= 150
        else:
            assert (export / name).read_bytes() == (models / name).read_bytes(), name
