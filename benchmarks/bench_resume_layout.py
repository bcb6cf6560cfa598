"""Resume on another layout beyond the test suite: ZeRO-3 as the saved layout, and bf16.

    .venv/bin/python benchmarks/bench_resume_layout.py [--data data/demo]   # CPU, gloo, <= 2 processes

For each case: an uninterrupted run A (6 steps, global batch 4) and a run B that stops after
step 3 on layout X and resumes on layout Y (train.universal path); prints |loss_A - loss_B|
per step. In bf16 the ZeRO stages themselves round differently, so the bf16 case also prints
an uninterrupted run at the target layout (C) for the spread between layouts without any
resume. Tiny vanilla model of tests/test_train.py.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "data.seq_length=32",
        "train.log_every=1", "train.progress_bar=false", "optim.warmup_steps=3",
        "train.eval_batches=2", "train.threads=1", "train.steps=6", "model.rotary_pct=1.0",
        "train.micro_batch_size=2", "train.global_batch_size=4"]


def run(run_dir, data, nproc, *sets):
    sets = TINY + [f"train.run_dir={run_dir}", f"data.path=[{data}/train_text_document]",
                   f"data.valid_path=[{data}/validation_text_document]",
                   f"data.tokenizer_model={data}/tokenizer.model", *sets]
    cmd = [sys.executable, "-m", "megaponder", "train", "--config",
           os.path.join(REPO, "examples", "configs", "tiny.yml")]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd[1:4] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(port), "-m", "megaponder", "train"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


CASES = [  # name, saved layout (nproc, sets), resumed layout (nproc, sets)
    ("dp=2 ZeRO-3 -> 1 process ZeRO-0", (2, ["parallel.zero_stage=3"]), (1, [])),
    ("1 process ZeRO-0 -> dp=2 ZeRO-3", (1, []), (2, ["parallel.zero_stage=3"])),
    ("dp=2 ZeRO-2 -> 1 process ZeRO-3", (2, ["parallel.zero_stage=2"]), (1, ["parallel.zero_stage=3"])),
    ("bf16 ZeRO-1 -> bf16 ZeRO-2", (1, ["train.precision=bf16", "parallel.zero_stage=1"]),
     (1, ["train.precision=bf16", "parallel.zero_stage=2"])),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.path.join(REPO, "data", "demo"))
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_resume_layout_")
    try:
        for name, (n0, saved), (n1, resumed) in CASES:
            a = run(f"{tmp}/a", args.data, n0, *saved)
            run(f"{tmp}/b", args.data, n0, *saved, "train.exit_at_step=3")
            b = run(f"{tmp}/b", args.data, n1, *resumed, "train.resume=true")
            print(f"\n{name}\nstep  |A-B| (resumed)" + ("   |A-C| (no resume, target layout)" if "bf16" in name else ""))
            c = run(f"{tmp}/c", args.data, n1, *resumed) if "bf16" in name else None
            for step in sorted(a):
                line = f"{step:4d}  {abs(a[step] - b[step]):.2e}"
                if c is not None:
                    line += f"            {abs(a[step] - c[step]):.2e}"
                print(line)
            for d in ("a", "b", "c"):
                shutil.rmtree(f"{tmp}/{d}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
