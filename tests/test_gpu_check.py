"""The prepared GPU run (benchmarks/gpu/check.py, started by benchmarks/gpu/run.sh) runs its
CPU path end to end on tiny shapes, so it is ready, not rotten, when a session gets a GPU:
every backend vs eager (outputs and gradients), engine training steps of vanilla and
AdaPonderLM (plain and chunked), the forced-halting decode, the static-shape decoder (eager
and compiled) vs the compacting one, and its JSON + markdown output."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_quick(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "benchmarks/gpu/check.py", "--device", "cpu", "--quick",
                           "--budget-s", "900", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout
    res = json.load(open(tmp_path / "check.json"))
    assert not res["failures"]
    masks = {(r["mask"], r["backend"], r["dtype"]) for r in res["attention"]["rows"] if r.get("ok")}
    for mask in ("causal", "documents", "key_bias", "compacted_queries"):
        assert {(mask, "sdpa", "bfloat16"), (mask, "auto", "float32")} <= masks
    runs = {r["name"]: r for r in res["training"]["rows"]}
    assert {"vanilla", "adaponderlm", "adaponderlm +chunked"} <= set(runs)
    assert all(r["falls"] and r["tokens_per_s"] > 0 for r in runs.values())
    # host syncs of a training step (one process: the skip decision; ZeRO-1's DeepSpeed checks)
    assert all(r["syncs_megaponder"] <= 2 and r["syncs_deepspeed"] <= 3 for r in runs.values()), runs
    first = res["training"]["rows"][0]   # megaponder plan vs measured (CPU: the process RSS,
    assert first["plan_mb"] > 0          # so only its presence is checked here)
    # chunking changes memory, not the numbers: same losses as the plain run
    assert abs(runs["adaponderlm +chunked"]["last_loss"] - runs["adaponderlm"]["last_loss"]) < 1e-4
    dec = res["decode"]["rows"]
    assert [r["halted"] for r in dec] == [0.1, 0.5, 0.9]
    for r in dec:   # tau calibration hit the forced halting rate (3 pondering passes)
        assert abs(r["mean_iters"] - (1 + 3 * (1 - r["halted"]))) < 0.1 and r["ideal"] > 1
        assert r["decode_speedup"] > 0 and 0 < r["active_tokens"] < 1
        assert r["staggered_speedup"] > 0 and r["staggered_overhead"] > 0
    assert dec[0]["active_tokens"] > dec[-1]["active_tokens"]   # more halting, fewer active slots
    static = {(r["family"], r["batch"]): r for r in res["static_decode"]["rows"]}
    assert set(static) == {("vanilla", 2), ("adaponderlm", 2)}
    for r in static.values():   # fp32 on CPU: the static decoders equal the compacting one
        assert r["ok"] and max(r["static_max_diff"], r["compiled_max_diff"]) < 1e-5, r
        assert r["compiled_token_agree"] == 1.0 and r["compiled_tokens_per_s"] > 0
    assert "| documents | sdpa | bfloat16 |" in open(tmp_path / "check.md").read()
