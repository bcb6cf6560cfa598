"""Resume on another parallel layout (tp, pp, dp, ZeRO stage) and train.global_batch_size:
a run continues through a chain of layouts (tp=2 -> pp=2 -> dp=2 -> 1 process) with the
losses of the uninterrupted run, through the real CLI (DeepSpeed engine, gloo, demo corpus)."""
import json
import os

import pytest

from test_train import losses, train, train_distributed

# rotary_pct=1: see test_train.test_cli_parallel_layouts_match_single_process (Adam turns the
# rounding noise of exactly-zero gradients into sign-dependent steps under partial rotary).
# global batch 4 on every layout: 1 process x 2 micro-batches of 2, or 2 data-parallel ranks x 1.
COMMON = ("train.steps=8", "model.rotary_pct=1.0", "train.micro_batch_size=2",
          "train.global_batch_size=4")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_data):
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, demo_data, *COMMON)
    return run


def test_resume_chain_across_layouts_matches_the_uninterrupted_run(tmp_path, demo_data, straight):
    """Steps 1-2 at tp=2 (ZeRO-0), 3-4 at pp=2 (ZeRO-1), 5-6 at dp=2 (ZeRO-2), 7-8 in one
    process, each segment resumed from the previous one's checkpoint: every save layout
    (tp, pp, dp x ZeRO 0/1/2) and every load path (ZeRO-1/2 flat partitions, ZeRO-0 torch
    state). Losses equal the uninterrupted single-process run within 1e-4: the two-process
    steps differ from it by all-reduce summation order (1e-5 relative in test_train); a
    layout change adds nothing (weights and Adam moments are copied exactly)."""
    run = tmp_path / "run"
    segments = [("parallel.tp=2",), ("parallel.pp=2", "parallel.zero_stage=1"),
                ("parallel.zero_stage=2",)]
    for i, layout in enumerate(segments):
        resume = ("train.resume=true",) if i else ()
        out = train_distributed(run, demo_data, 2, *COMMON, f"train.exit_at_step={2 * i + 2}",
                                *layout, *resume)
        if i:
            assert "on a new layout" in out.stdout + out.stderr
        ckpt = run / "checkpoints" / f"global_step{2 * i + 2}"
        meta = json.load(open(ckpt / "meta.json"))
        assert meta["global_batch"] == 4 and meta["step"] == 2 * i + 2
        _universal_weights_equal_model_pt(ckpt)
    proc = train(run, demo_data, *COMMON, "train.resume=true")
    assert "on a new layout" in proc.stdout + proc.stderr
    want, got = losses(straight), losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-4, (step, got[step], want[step])
    assert want[8] < want[1]


def _universal_weights_equal_model_pt(ckpt):
    """Every parameter's layout-free fp32 master is the consolidated weight, full-shaped."""
    import torch
    full = torch.load(ckpt / "model.pt", weights_only=True)
    saved = sorted(os.listdir(ckpt / "universal" / "zero"))
    assert saved == sorted(full)
    for name in saved:
        part = torch.load(ckpt / "universal" / "zero" / name / "fp32.pt", weights_only=True)["param"]
        assert torch.equal(part, full[name]), name


def test_resume_with_another_global_batch_is_refused_in_one_line():
    """The data position is a count of samples: another global batch would continue another
    run (a ConfigError: the command line prints it as one line, exit 2)."""
    from megaponder.config import ConfigError
    from megaponder.train.reshard import check_global_batch

    check_global_batch("ckpt", {"global_batch": 4}, 4)
    with pytest.raises(ConfigError) as err:
        check_global_batch("runs/x/checkpoints/global_step3", {"global_batch": 4}, 2)
    msg = str(err.value)
    assert "\n" not in msg and "global batch of 4" in msg and "train.global_batch_size=4" in msg


def test_layout_that_cannot_hold_the_model_is_refused():
    """tp=3 cannot split 4 heads: refused at config time, before any checkpoint is read."""
    from megaponder.config import ConfigError, load_config
    from megaponder.train.preflight import preflight
    from test_train import REPO_ROOT

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml"),
                      ["train.resume=true"], check_paths=False)
    cfg.parallel.tp = 3
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.num_heads=4"):
        preflight(cfg, check_paths=False, world_size=3)


def test_global_batch_size_derives_accumulation_from_the_world_size():
    from megaponder.config import ConfigError, load_config
    from megaponder.train.preflight import preflight
    from megaponder.data.schedule import grad_accum_for
    from test_train import REPO_ROOT

    cfg = load_config(os.path.join(REPO_ROOT, "examples", "configs", "pythia-1.4b-ponderlm.yml"),
                      check_paths=False)
    assert cfg.train.global_batch_size == 1024 and cfg.parallel.tp == 2  # Pythia's 1024 x 2048
    # 1024 sequences whatever the world: 8 ranks at tp=2 -> dp=4 -> 128 steps of 2; 16 -> 64
    assert grad_accum_for(cfg.train, 4) == 128 and grad_accum_for(cfg.train, 8) == 64
    with pytest.raises(ConfigError) as err:
        preflight(cfg, check_paths=False, world_size=6)   # dp=3: 1024 is not a multiple of 6
    msg = str(err.value)
    assert "train.global_batch_size=1024 is not a multiple of micro_batch_size x dp = 2 x 3 = 6" in msg
    assert "1020 or 1026" in msg   # the nearest global batches that work
