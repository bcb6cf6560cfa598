"""train.phases: continued pretraining Pythia -> AdaPonderLM in one run, gate-only phase (token
budget) then joint training, through the real CLI; resume across the boundary is exact."""
import json

import pytest
import torch

from test_train import losses, train

# TINY: 4 sequences x 32 tokens = 128 tokens per step; 300 tokens round up to 3 steps
PHASES = "train.phases=[{tokens: 300, freeze_backbone: true, lr: 0.004}, {tokens: null}]"
RUN = ("train.steps=6", "model.family=adaponderlm", PHASES)


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A random tiny Pythia (Hugging Face form) converted to an AdaPonderLM start."""
    transformers = pytest.importorskip("transformers")
    from megaponder.config import ModelConfig
    from megaponder.convert.checkpoint import hf_to_megaponder_checkpoint
    from megaponder.convert.hf import hf_config_from_model_config

    root = tmp_path_factory.mktemp("pythia")
    shape = ModelConfig(vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(hf_config_from_model_config(shape)).save_pretrained(root / "hf")
    hf_to_megaponder_checkpoint(str(root / "hf"), str(root / "init"), family="adaponderlm")
    return root / "init"


def _state(path):
    import megaponder
    return megaponder.load_model(str(path)).state_dict()


def test_gate_phase_then_joint_training_in_one_run(tmp_path, demo_data, init_checkpoint):
    init = [f"train.init_checkpoint={init_checkpoint}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, demo_data, *RUN, *init)
    # stop exactly at the boundary (after the 3 gate-only steps), resume into the joint phase
    train(resumed, demo_data, *RUN, *init, "train.exit_at_step=3")
    train(resumed, demo_data, *RUN, "train.resume=true")

    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    phase = {r["step"]: r["phase"] for r in rows if "phase" in r}
    assert phase == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:   # same-layout resume across the boundary: exact
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])

    before = _state(init_checkpoint)
    at_boundary = _state(resumed / "checkpoints" / "global_step3")
    after = _state(straight)
    gates = {k for k in before if k.startswith("gates.")}
    assert gates
    backbone = [k for k in before if k not in gates]
    # phase 1: the backbone is bit-identical (lr 0 also switches AdamW's weight decay off),
    # the gates moved; phase 2: everything moves
    assert all(torch.equal(before[k], at_boundary[k]) for k in backbone)
    assert all(not torch.equal(before[k], at_boundary[k]) for k in gates)
    moved = [k for k in backbone if not torch.equal(at_boundary[k], after[k])]
    assert len(moved) == len(backbone), sorted(set(backbone) - set(moved))[:5]


def test_phase_schedule_rounds_token_budgets_to_steps():
    from megaponder.config import ConfigError, load_config
    from megaponder.train.phases import phase_bounds

    cfg = load_config(None, ["train.steps=10", "model.family=adaponderlm",
                             "train.phases=[{tokens: 1.0e3, freeze_backbone: true}, {tokens: 200}, {}]"],
                      check_paths=False)
    assert phase_bounds(cfg, tokens_per_step=128) == [(0, 8), (8, 10), (10, 10)]
    with pytest.raises(ConfigError, match=r"train.phases\[0\].tokens must be a positive"):
        load_config(None, ["train.phases=[{freeze_backbone: true}, {}]"], check_paths=False)
    with pytest.raises(ConfigError, match="ponder.freeze_backbone=true and train.phases"):
        load_config(None, ["ponder.freeze_backbone=true", "train.phases=[{tokens: 10}]"],
                    check_paths=False)
