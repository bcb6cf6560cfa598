"""Single-process checks of the parallel wrapper modules and the TP_PLAN head split (the
multi-process parity of both is in tests/test_parallel_families.py / test_parallel_dist.py)."""
import pytest
import torch

from megaponder.config import ModelConfig
from megaponder.models.llama import LlamaAttention, LlamaLayer
from megaponder.models.neox import NeoXLayer
from megaponder.parallel.parallelize import InTPRngStream, Transparent, _split_heads, unwrap


def _llama_cfg(**kw):
    return ModelConfig(backbone="llama", vocab_size=128, hidden_size=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                       rotary_pct=1.0, **kw)


def test_transparent_keeps_keys_and_shows_in_repr():
    layer = LlamaLayer(_llama_cfg(attention_dropout=0.1), 0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    names = [k for k, _ in layer.named_parameters()]
    layer.attn = InTPRngStream(layer.attn)
    assert list(layer.state_dict()) == list(before)          # same keys, same order
    assert [k for k, _ in layer.named_parameters()] == names
    assert "InTPRngStream" in repr(layer)
    # attributes read through, and train/eval reach the unregistered inner module
    assert layer.attn.num_kv_heads == 2 and unwrap(layer.attn) is layer.attn.inner
    layer.eval()
    assert not layer.attn.inner.training
    layer.train()
    assert layer.attn.inner.training
    # loading through the wrapper writes the inner module's parameters
    sd = {k: torch.zeros_like(v) for k, v in before.items()}
    layer.load_state_dict(sd)
    assert layer.attn.inner.q_proj.weight.abs().sum() == 0
    assert isinstance(layer.attn, Transparent)


def test_tp_plans_name_real_linears():
    for cls, cfg in ((NeoXLayer, ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4)),
                     (LlamaLayer, _llama_cfg())):
        layer = cls(cfg, 0)
        for path, style in cls.TP_PLAN.items():
            assert isinstance(layer.get_submodule(path), torch.nn.Linear) and style in ("column", "row")


def test_split_heads_gqa_and_errors():
    attn = LlamaAttention(_llama_cfg(), 0)
    _split_heads(attn, 2)
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    bad = LlamaAttention(_llama_cfg(), 0)
    with pytest.raises(ValueError, match=r"parallel.tp=4 does not divide model.num_kv_heads=2"):
        _split_heads(bad, 4)
    assert (bad.num_heads, bad.num_kv_heads) == (4, 2)   # untouched on the error
