"""megaponder's GPT-NeoX backbone against Hugging Face's GPTNeoXForCausalLM, and checkpoint
conversion both ways.

Tolerance 1e-5 (fp32): both compute the same ops in the same order up to kernel choice
(sdpa vs. sdpa/eager inside HF); observed differences are ~2e-7.
"""
import os
import subprocess
import sys

import pytest
import torch

from megaponder.config import ModelConfig
from megaponder.convert.hf import hf_config_from_model_config, hf_to_megaponder
from megaponder.models.base import CausalLM

from conftest import REPO_ROOT

transformers = pytest.importorskip("transformers")


def _pair(seed, **shape):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=shape.pop("vocab", 300), padded_vocab_size=None, **shape)
    hf = transformers.GPTNeoXForCausalLM(hf_config_from_model_config(cfg)).eval()
    ours = CausalLM(cfg).eval()
    ours.load_state_dict(hf_to_megaponder(hf.state_dict(), cfg.num_layers))
    return cfg, hf, ours


SHAPES = [
    dict(hidden_size=64, num_heads=4, num_layers=2, rotary_pct=0.25, parallel_residual=True),
    dict(hidden_size=64, num_heads=4, num_layers=2, rotary_pct=1.0, parallel_residual=True),
    dict(hidden_size=48, num_heads=3, num_layers=3, rotary_pct=0.25, parallel_residual=False),
    dict(hidden_size=32, num_heads=2, num_layers=1, rotary_pct=1.0, parallel_residual=False,
         intermediate_size=80, rotary_base=500.0),
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['hidden_size']}-rot{s['rotary_pct']}-par{int(s['parallel_residual'])}")
def test_logits_match_hf(shape, backend):
    cfg, hf, ours = _pair(0, attention_backend=backend, max_position_embeddings=64, **shape)
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, 5:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=0), (got - ref)[real].abs().max()
    # unpadded batch too
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_loss_matches_hf():
    cfg, hf, ours = _pair(1, hidden_size=64, num_heads=4, num_layers=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss
        got = ours(ids[:, :-1], targets=ids[:, 1:]).loss
    assert abs(ref.item() - got.item()) < 1e-5


def _run_tool(*args):
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"), *args],
                   check=True, capture_output=True, text=True)


def test_hf_to_megaponder_to_hf_round_trip_is_identical(tmp_path):
    cfg, hf, _ = _pair(2, hidden_size=64, num_heads=4, num_layers=2, rotary_pct=0.25)
    hf.save_pretrained(tmp_path / "hf")
    _run_tool("--from", "hf", "--to", "megaponder", "--input", str(tmp_path / "hf"),
              "--output", str(tmp_path / "mp"))
    import megaponder

    model = megaponder.load_model(str(tmp_path / "mp"))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    _run_tool("--from", "megaponder", "--to", "hf", "--input", str(tmp_path / "mp"),
              "--output", str(tmp_path / "hf2"))
    back = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf2")
    original = hf.state_dict()
    returned = back.state_dict()
    assert set(original) == set(returned)
    for name, tensor in original.items():
        assert torch.equal(tensor, returned[name]), name
