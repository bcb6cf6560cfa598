"""Every attention backend against the eager reference on the same inputs and masks.

fp32 tolerance 1e-5: the kernels differ only in summation order and in how the softmax is
fused (observed max differences ~1e-7)."""
import pytest
import torch

from megaponder.models.attention import AttentionSpec, attention, available_backends

B, H, T, D = 2, 3, 12, 8


def _qkv(tq=T, tk=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, tq, D, generator=g), torch.randn(B, H, tk, D, generator=g),
            torch.randn(B, H, tk, D, generator=g))


def _specs():
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 9:] = False
    bias = torch.log(torch.rand(B, 1, 1, T, generator=torch.Generator().manual_seed(3)) + 1e-3)
    return {
        "causal": (AttentionSpec(), T),
        "non_causal": (AttentionSpec(causal=False), T),
        "documents": (AttentionSpec(segment_ids=seg), T),
        "padding": (AttentionSpec(key_padding_mask=pad), T),
        "key_bias": (AttentionSpec(key_bias=bias), T),
        "decode_last_4": (AttentionSpec(), 4),  # queries are the last 4 keys (KV cache)
        "compacted_queries": (AttentionSpec(q_index=torch.tensor([[0, 3, 7], [2, 5, 11]])), 3),
        "everything": (AttentionSpec(segment_ids=seg, key_padding_mask=pad, key_bias=bias), T),
    }


@pytest.mark.parametrize("backend", [b for b in available_backends() if b not in ("eager", "auto")] + ["auto"])
@pytest.mark.parametrize("name", list(_specs()))
def test_backend_matches_eager(backend, name):
    spec, tq = _specs()[name]
    q, k, v = _qkv(tq=tq)
    ref = attention(q, k, v, spec, backend="eager")
    got = attention(q, k, v, spec, backend=backend)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()


def test_causal_mask_means_no_future_leak():
    q, k, v = _qkv()
    out = attention(q, k, v, AttentionSpec(), backend="eager")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 10.0
    v2[:, :, 6:] -= 10.0
    out2 = attention(q, k2, v2, AttentionSpec(), backend="eager")
    assert torch.equal(out[:, :, :6], out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


def test_compacted_queries_equal_the_full_rows():
    """Computing only some query rows (halted tokens skipped) gives exactly those rows."""
    q, k, v = _qkv()
    full = attention(q, k, v, AttentionSpec(), backend="eager")
    rows = torch.tensor([[0, 3, 7], [2, 5, 11]])
    q_sub = torch.stack([q[b, :, rows[b]] for b in range(B)])
    sub = attention(q_sub, k, v, AttentionSpec(q_index=rows), backend="sdpa")
    expect = torch.stack([full[b, :, rows[b]] for b in range(B)])
    assert torch.allclose(sub, expect, atol=1e-6)
