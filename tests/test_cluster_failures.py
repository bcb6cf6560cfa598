"""Failures on one rank of a multi-process job (megaponder/collectives.py,
megaponder/data/checks.py): start-up errors every rank agrees on, the collective timeout for a
stuck rank, non-finite gradients behind a finite loss under bf16 + ZeRO-2, and data checks that
scan once per job.

The end-to-end runs start their processes the way ``srun`` does: each with SLURM_PROCID /
SLURM_NTASKS and nothing supervising them (torchrun would kill a failed worker's siblings
itself, which hides a hang)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from dist_utils import free_port, run_distributed
from test_train import TINY

from megaponder.config import ConfigError, config_from_dict, load_config
from megaponder.data import IndexedDatasetBuilder

TINY_CONFIG = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")
DATA_FILES = ("train_text_document", "validation_text_document")


def node_copy(demo, root, name):
    """A 'node': a folder holding its own copy of the demo data under data/, used as cwd."""
    node = root / name
    (node / "data").mkdir(parents=True)
    for prefix in DATA_FILES:
        for ext in (".bin", ".idx"):
            shutil.copy(demo / (prefix + ext), node / "data" / (prefix + ext))
    shutil.copy(demo / "tokenizer.model", node / "data" / "tokenizer.model")
    return node


def srun_like(cwds, run_dir, *extra, env=None):
    """One `megaponder train` per cwd, rank = its index, rendezvous on a free local port."""
    port = str(free_port())
    sets = TINY + [f"train.run_dir={run_dir}", "data.path=[data/train_text_document]",
                   "data.valid_path=[data/validation_text_document]",
                   "data.tokenizer_model=data/tokenizer.model", *extra]
    procs = []
    for rank, cwd in enumerate(cwds):
        rank_env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        rank_env.update({"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "MASTER_PORT": port,
                         "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(len(cwds)),
                         "SLURM_LOCALID": str(rank), "SLURM_NTASKS_PER_NODE": str(len(cwds)),
                         "SLURM_JOB_NODELIST": "localhost", **(env or {})})
        cmd = [sys.executable, "-m", "megaponder", "train", "--config", TINY_CONFIG]
        for s in sets:
            cmd += ["--set", s]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(proc, timeout=180):
    """(returncode, stdout, stderr, time of exit); a hung rank fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"rank hung (killed after {timeout} s):\n{err[-2000:]}")
    return proc.returncode, out, err, time.time()


def finish_all(procs, timeout=180):
    """finish() of every process, concurrently (each exit time is its own)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(lambda p: finish(p, timeout), procs))


def user_lines(err):
    return [line for line in err.splitlines() if line.startswith("megaponder: ")]


def test_a_damaged_file_on_one_node_stops_every_rank_with_its_message(tmp_path, demo_data):
    """Rank 1's copy of the training .bin is truncated (its node's disk), rank 0's is fine:
    both exit 2 within seconds of each other; rank 1 prints its error, rank 0 which rank
    failed and why. parallel.timeout_minutes=1 turns a regression into a timeout (exit 4)
    instead of a 30-minute hang."""
    good, bad = node_copy(demo_data, tmp_path, "node0"), node_copy(demo_data, tmp_path, "node1")
    with open(bad / "data" / "train_text_document.bin", "r+b") as f:
        f.truncate(1000)
    procs = srun_like([good, bad], tmp_path / "run", "train.steps=2", "parallel.timeout_minutes=1")
    results = finish_all(procs)
    for rank, (rc, _, err, _) in enumerate(results):
        assert rc == 2, f"rank {rank}: rc {rc}\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
    own = user_lines(results[1][2])
    assert len(own) == 1 and own[0].startswith(
        "megaponder: data/train_text_document.bin: bad file size"), results[1][2][-2000:]
    peer = user_lines(results[0][2])
    assert peer == [f"megaponder: start-up failed on rank 1 (opening the data): {own[0][12:]}"], peer
    assert abs(results[0][3] - results[1][3]) < 5  # neither was left waiting for the other
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stuck_rank_times_out_and_bf16_zero2_skips_nan_gradients(tmp_path, demo_data):
    """bf16 + ZeRO-2, 2 ranks: rank 1's gradients are NaN at step 2 while its loss stays
    finite (MEGAPONDER_FAULT_NAN_GRAD): the update is skipped on both ranks and counted, the
    next losses are finite (the weights survived). Then rank 1 is stopped (SIGSTOP, a hung
    node): rank 0 leaves the next collective after parallel.timeout_minutes (0.15 = 9 s) with
    one line and exit 4 (9 s, not less: the rendezvous of two loaded processes must fit)."""
    run_dir = tmp_path / "run"
    procs = srun_like([REPO_ROOT, REPO_ROOT], run_dir, "train.steps=40", "train.precision=bf16",
                      "parallel.zero_stage=2", "parallel.timeout_minutes=0.15",
                      "data.path=[%s/train_text_document]" % demo_data,
                      "data.valid_path=[%s/validation_text_document]" % demo_data,
                      "data.tokenizer_model=%s/tokenizer.model" % demo_data,
                      env={"MEGAPONDER_FAULT_NAN_GRAD": "1@2", "MEGAPONDER_FAULT_STEP_SLEEP": "0.1"})
    try:
        deadline = time.time() + 150
        rows = []
        while len(rows) < 4:
            assert procs[0].poll() is None and time.time() < deadline, finish(procs[0])[2][-3000:]
            time.sleep(0.05)
            if (run_dir / "metrics.jsonl").exists():
                rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")
                        if line.endswith("\n")]
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.time()
        rc, _, err, _ = finish(procs[0], timeout=60)
        waited = time.time() - stopped
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert rc == 4, err[-3000:]
    lines = user_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        "megaponder: rank 0: a collective did not complete within parallel.timeout_minutes=0.15"), lines
    assert 8 < waited < 45, waited  # 9 s timeout plus the step in flight
    rows = {r["step"]: r for r in (json.loads(line) for line in open(run_dir / "metrics.jsonl"))}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert rows[2]["loss"] == rows[2]["loss"] and rows[2]["grad_norm"] == float("inf")
    assert all(np.isfinite([rows[s]["loss"], rows[s]["grad_norm"]]).all() for s in (1, 3, 4))


def test_bf16_with_zero_stage_0_is_refused_at_validation():
    """deepspeed.initialize would fail inside DeepSpeed ("unsupported mix of
    model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32")."""
    with pytest.raises(ConfigError, match=r"train.precision=bf16 needs parallel.zero_stage>=1 .*"
                                          r"set parallel.zero_stage=1"):
        load_config(TINY_CONFIG, ["train.precision=bf16", "parallel.zero_stage=0"], check_paths=False)
    # (no data on disk needed: the refusal is a rule between two keys)
    load_config(TINY_CONFIG, ["train.precision=bf16", "parallel.zero_stage=1"], check_paths=False)


# -- data checks: once per job, every dataset opened once (2 gloo processes) ----------------
def _write(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        b.add_item(np.asarray(d))
        b.end_document()
    b.finalize(prefix + ".idx")


def _data_cfg(vocab):
    return config_from_dict({"model": {"vocab_size": vocab},
                             "data": {"path": ["a"], "valid_path": ["b"], "seq_length": 8,
                                      "tokenizer_model": None}}, check_paths=False)


def _outcome(fn):
    """("ok", result) or (error class, its one line, whether this rank prints it)."""
    from megaponder.errors import one_line
    try:
        return ("ok", fn())
    except Exception as err:  # noqa: BLE001 - the test compares the error's kind and text
        return (type(err).__name__, one_line(err), getattr(err, "_megaponder_report_here", None))


def _fail_on(rank, error):
    from megaponder.collectives import agree_on_failure
    with agree_on_failure("a phase"):
        if rank:
            raise error


def _checks_on_two_ranks(rank, world, root):
    """Per rank, in its own 'node' folder: count .idx reads and token scans for good data;
    then the same data with a token beyond the vocabulary; then rank 1's copy differing."""
    import megaponder.data.checks as checks
    from megaponder.data import build_train_valid_datasets
    from megaponder.data.indexed import IndexedDataset

    opened, scanned = [], []
    read_index, token_range = IndexedDataset._read_index, checks.token_range
    IndexedDataset._read_index = lambda self, *a: (opened.append(self.prefix), read_index(self, *a))[1]
    checks.token_range = lambda ds, *a: (scanned.append(ds.prefix), token_range(ds, *a))[1]
    os.chdir(os.path.join(root, f"node{rank}"))
    log = []
    datasets = checks.open_and_check_data(_data_cfg(100), log.append)
    train, valid = build_train_valid_datasets(_data_cfg(100).data, 1, 16, 4, datasets)
    good = {"opened": sorted(opened), "scanned": list(scanned), "log": log, "samples": len(train)}
    too_small = _outcome(lambda: checks.open_and_check_data(_data_cfg(50)))
    os.chdir(os.path.join(root, f"other{rank}"))
    differing = _outcome(lambda: checks.open_and_check_data(_data_cfg(100)))
    os.chdir(root)  # no data here: the same error on both ranks
    everywhere = _outcome(lambda: checks.open_and_check_data(_data_cfg(100)))
    bug = _outcome(lambda: _fail_on(rank, RuntimeError("boom")))
    return good, too_small, differing, everywhere, bug, _bf16_zero1_and_zero2()


def _bf16_zero1_and_zero2():
    """Two optimizer steps of bf16 training with ZeRO-1 (DeepSpeed's bf16 optimizer) and with
    ZeRO-2 (its ZeRO optimizer), 3 micro-batches each, same weights and data: grad norms and
    the parameters' sum."""
    import torch

    from megaponder.models import build_model
    from megaponder.parallel import parallelize
    from megaponder.train.engine import build_engine
    from megaponder.parallel.state import build_topology

    topo = build_topology()
    out = {}
    for stage in (1, 2):
        cfg = load_config(TINY_CONFIG, ["model.hidden_size=32", "model.num_layers=1",
                                        "model.vocab_size=256", "train.precision=bf16",
                                        f"parallel.zero_stage={stage}", "train.micro_batch_size=1",
                                        "optim.grad_clip=0"], check_paths=False)
        cfg.train.grad_accum_steps = 3
        torch.manual_seed(0)
        engine = build_engine(parallelize(build_model(cfg), cfg, topo), cfg, topo)
        ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(topo.rank))
        norms = [engine.train_step({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})["grad_norm"]
                 for _ in range(2)]
        out[stage] = (norms, float(sum(p.double().sum() for p in engine.module.parameters())))
    # DeepSpeed's bf16 gradient check off (the default of some releases) and NaN gradients
    # behind a finite loss at step 1: the update goes through, so the run must stop at once
    import megaponder.train.engine as engine_module
    from megaponder.train.guards import FAULT_NAN_GRAD_ENV

    ds_config = engine_module.deepspeed_config

    def unchecked(*args):
        return {**ds_config(*args), "bf16": {"enabled": True, "check_grad_overflow": False}}

    engine_module.deepspeed_config, os.environ[FAULT_NAN_GRAD_ENV] = unchecked, "0@1,1@1"
    torch.manual_seed(0)
    engine = build_engine(parallelize(build_model(cfg), cfg, topo), cfg, topo)
    out["unchecked"] = _outcome(lambda: engine.train_step({"input_ids": ids[:, :-1],
                                                           "targets": ids[:, 1:]}))
    out["unchecked_finite"] = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    return out


def test_data_checks_scan_once_per_job_and_fail_identically(tmp_path, monkeypatch):
    """2 gloo processes, each in its own 'node' folder; also bf16 ZeRO-1 against ZeRO-2 with
    gradient accumulation in the same processes (their start-up is the expensive part)."""
    from megaponder.data.checks import check_data_fits, open_datasets
    from megaponder.errors import one_line

    docs = [list(range(i, i + 9)) for i in range(0, 80, 9)]  # ids 0..80, under vocab 100
    for name in ("node0", "node1", "other0", "other1"):
        (tmp_path / name).mkdir()
        _write(str(tmp_path / name / "a"), docs + (docs[:1] if name == "other1" else []))
        _write(str(tmp_path / name / "b"), docs[:3])
    results = run_distributed(_checks_on_two_ranks, 2, args=(str(tmp_path),))
    (good0, small0, diff0, both0, bug0, bf16), (good1, small1, diff1, both1, bug1, _) = results
    # every dataset opened once per rank (checks, samples and validation share it); rank 0 alone scans
    assert good0["opened"] == good1["opened"] == ["a", "b"]
    assert good0["scanned"] == ["a", "b"] and good1["scanned"] == []
    assert good0["log"][0].startswith("data a: 81 tokens, ids 0..80 < vocab 100") and good1["log"] == []
    assert good0["samples"] == good1["samples"] >= 16
    # a shared file with an id beyond the vocabulary: the single-process message, on both ranks
    monkeypatch.chdir(tmp_path / "node0")
    with pytest.raises(Exception) as alone:  # the single-process check
        check_data_fits(_data_cfg(50), datasets=open_datasets(_data_cfg(50).data))
    alone = one_line(alone.value)
    assert small0 == ("DataError", alone, True) and "token id 80" in alone
    assert small1 == ("PeerFailed", f"start-up failed on rank 0 (data checks): {alone}", False)
    # rank 1's copy of a differs from rank 0's (another node-local copy): refused by its size
    sizes = {n: (os.path.getsize(tmp_path / n / "a.bin"), os.path.getsize(tmp_path / n / "a.idx"))
             for n in ("other0", "other1")}
    assert diff1[0] == "DataError" and diff1[2] is True and diff1[1].startswith(
        f"a.bin/.idx (bytes) are {sizes['other1']} on rank 1 but {sizes['other0']} on rank 0"), diff1
    assert diff0 == ("PeerFailed", f"start-up failed on rank 1 (data checks): {diff1[1]}", True)
    # the same error on every rank: each raises its own, only rank 0 prints it
    assert both0[0] == both1[0] == "DatasetNotFoundError" and both0[1] == both1[1]
    assert (both0[2], both1[2]) == (True, False)
    # a bug on rank 1 keeps its type there (traceback, exit 1); rank 0 names it
    assert bug1[:2] == ("RuntimeError", "boom")
    assert bug0 == ("PeerFailed", "start-up failed on rank 1 (a phase): RuntimeError: boom", True)
    # DeepSpeed's bf16 optimizer used to count micro-batch k of gas (gas - k) times (~1.6x the
    # norm here). Both keep fp32 gradients and master weights and differ only in reduction
    # order and bf16 rounding of the working copy: 1e-3 relative.
    (norms1, sum1), (norms2, sum2) = bf16[1], bf16[2]
    assert np.allclose(norms1, norms2, rtol=1e-3), (norms1, norms2)
    assert abs(sum1 - sum2) <= 1e-3 * abs(sum2), (sum1, sum2)
    assert bf16["unchecked"][0] == "TrainingDiverged" and "DeepSpeed applied an update whose " \
        "gradient norm is inf" in bf16["unchecked"][1] and not bf16["unchecked_finite"], bf16
