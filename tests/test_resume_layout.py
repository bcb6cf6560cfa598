"""Resume on another parallel layout (tp, pp, dp, ZeRO stage) and train.global_batch_size:
a run saved under 2 processes continues in 1 process with the losses of the uninterrupted
run, through the real CLI (DeepSpeed engine, gloo, demo corpus)."""
import json
import os

import pytest

from test_train import demo_data, losses, train, train_distributed  # noqa: F401

# rotary_pct=1: see test_train.test_cli_parallel_layouts_match_single_process (Adam turns the
# rounding noise of exactly-zero gradients into sign-dependent steps under partial rotary).
# global batch 4 on every layout: 1 process x 2 micro-batches of 2, or 2 data-parallel ranks x 1.
COMMON = ("train.steps=6", "model.rotary_pct=1.0", "train.micro_batch_size=2",
          "train.global_batch_size=4")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_data):  # noqa: F811
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, demo_data, *COMMON)
    return run


@pytest.mark.parametrize("layout", [
    ("parallel.tp=2",),
    ("parallel.pp=2", "parallel.zero_stage=1"),
    ("parallel.zero_stage=2",),          # dp=2
], ids=["tp2", "pp2-zero1", "dp2-zero2"])
def test_saved_on_two_processes_resumes_on_one(tmp_path, demo_data, straight, layout):  # noqa: F811
    straight = losses(straight)
    """Steps 1-3 under 2 processes, then 4-6 in 1 process from the step-3 checkpoint: equal to
    the uninterrupted 1-process run within 1e-4 (the 2-process part differs from it by
    all-reduce summation order only, 1e-5 relative in test_train; the resumed part inherits that
    and adds nothing: weights and Adam moments are copied exactly)."""
    run = tmp_path / "run"
    train_distributed(run, demo_data, 2, *COMMON, "train.exit_at_step=3", *layout)
    meta = json.load(open(run / "checkpoints" / "global_step3" / "meta.json"))
    assert meta["global_batch"] == 4 and (meta["tp"], meta["pp"], meta["dp"]) != (1, 1, 1)
    proc = train(run, demo_data, *COMMON, "train.resume=true")
    assert "on a new layout" in proc.stdout + proc.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - straight[step]) <= 1e-4, (step, got[step], straight[step])
    assert straight[6] < straight[1]


def test_resume_with_another_global_batch_fails_with_one_line(tmp_path, demo_data, straight):  # noqa: F811
    """The data position is a count of samples: another global batch would continue another
    run. One clear line, exit 2, the saved checkpoint untouched."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = sorted(os.listdir(run / "checkpoints"))
    proc = train(run, demo_data, "train.steps=8", "model.rotary_pct=1.0", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "train.resume=true", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "global batch of 4" in proc.stderr and "train.global_batch_size=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(run / "checkpoints")) == before


def test_layout_that_cannot_hold_the_model_is_refused():
    """tp=3 cannot split 4 heads: refused at config time, before any checkpoint is read."""
    from megaponder.config import ConfigError, load_config, validate
    from test_train import REPO_ROOT

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml"),
                      ["train.resume=true"], check_paths=False)
    cfg.parallel.tp = 3
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.num_heads=4"):
        validate(cfg, check_paths=False, world_size=3)


def test_global_batch_size_derives_accumulation_from_the_world_size():
    from megaponder.config import ConfigError, load_config, validate
    from megaponder.data.schedule import grad_accum_for
    from test_train import REPO_ROOT

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "configs", "pythia-1.4b-ponderlm.yml"),
                      check_paths=False)
    assert cfg.train.global_batch_size == 256 and cfg.parallel.tp == 2
    # 256 sequences whatever the world: 8 ranks at tp=2 -> dp=4 -> 32 steps of 2; 16 -> 16
    assert grad_accum_for(cfg.train, 4) == 32 and grad_accum_for(cfg.train, 8) == 16
    with pytest.raises(ConfigError) as err:
        validate(cfg, check_paths=False, world_size=6)   # dp=3: 256 is not a multiple of 6
    msg = str(err.value)
    assert "train.global_batch_size=256 is not a multiple of micro_batch_size x dp = 2 x 3 = 6" in msg
    assert "252 or 258" in msg   # the nearest global batches that work
