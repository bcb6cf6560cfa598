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


# -- bf16, the auto policy, varlen packing, flex without a dense mask ---------------------------
def _bf16_backends():
    # flex on CPU has no backward; its bf16 forward is checked in test_bf16_forward_matches_eager
    return [b for b in available_backends() if b not in ("eager", "flash", "flex")]


@pytest.mark.parametrize("backend", _bf16_backends())
@pytest.mark.parametrize("name", ["causal", "documents", "key_bias", "compacted_queries"])
def test_bf16_matches_eager(backend, name):
    """bf16 tolerance, relative to eager's own bf16 error: every kernel reads the same bf16
    q/k/v, so what differs is where it rounds (eager rounds the probabilities to bf16 before
    P·V, fused kernels keep them in fp32). A backend may be at most 2x eager-bf16's distance
    from the fp32 truth plus half a bf16 ulp at 1.0 (2^-9 ~ 2e-3); a wrong mask is off by O(1)."""
    spec, tq = _specs()[name]
    q, k, v = _qkv(tq=tq)
    g = torch.randn(B, H, tq, D, generator=torch.Generator().manual_seed(5))

    def run(bk, dtype):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = attention(*xs, spec, backend=bk)
        return out.float(), torch.autograd.grad(out, xs, g.to(dtype))

    truth, truth_g = run("eager", torch.float32)
    ref, ref_g = run("eager", torch.bfloat16)
    got, got_g = run(backend, torch.bfloat16)
    budget = 2 * (ref - truth).abs().max() + 2 ** -9
    assert (got - truth).abs().max() <= budget
    for gg, rg, tg in zip(got_g, ref_g, truth_g):
        budget = 2 * (rg.float() - tg).abs().max() + 2 ** -9 * tg.abs().max()
        assert (gg.float() - tg).abs().max() <= budget


@pytest.mark.skipif("flex" not in available_backends(), reason="torch without FlexAttention")
@pytest.mark.parametrize("name", ["causal", "documents", "key_bias", "compacted_queries", "everything"])
def test_flex_bf16_forward_matches_eager(name):
    spec, tq = _specs()[name]
    q, k, v = _qkv(tq=tq)
    truth = attention(q, k, v, spec, backend="eager")
    ref = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), spec, backend="eager").float()
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), spec, backend="flex").float()
    assert (got - truth).abs().max() <= 2 * (ref - truth).abs().max() + 2 ** -9


@pytest.mark.skipif("flex" not in available_backends(), reason="torch without FlexAttention")
def test_flex_compacted_queries_equal_masked_dense_rows():
    """AdaPonderLM's compacted step: only the active rows are queries, keys are every token.
    flex expresses it with an index table in mask_mod (no [Tq, Tk] mask); it must equal the
    corresponding rows of the dense masked path over all tokens."""
    from megaponder.models import kernels

    t = 40
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for _ in range(3))
    seg = torch.tensor([[0] * 17 + [1] * 23, [0] * 40])
    rows = torch.stack([torch.sort(torch.randperm(t, generator=g)[:13]).values for _ in range(B)])
    full = attention(q, k, v, AttentionSpec(segment_ids=seg), backend="sdpa")
    q_sub = torch.stack([q[b, :, rows[b]] for b in range(B)])
    spec = AttentionSpec(q_index=rows, segment_ids=seg)
    got = attention(q_sub, k, v, spec, backend="flex")
    expect = torch.stack([full[b, :, rows[b]] for b in range(B)])
    assert torch.allclose(got, expect, atol=1e-5, rtol=0)
    # the block mask was built once and cached on the spec (one per forward, not per layer)
    assert len(spec._kernel_cache) == 1
    attention(q_sub, k, v, spec, backend="flex")
    assert len(spec._kernel_cache) == 1
    assert not any(isinstance(x, torch.Tensor) and x.shape[-2:] == (13, t)
                   for x in vars(spec._kernel_cache[next(iter(spec._kernel_cache))]).values())
    assert kernels.mask_kind(spec, 13, t) == "compacted_queries+documents"


def test_documents_cu_seqlens_give_the_document_mask():
    """flash-attn varlen's packing (cu_seqlens over B*T tokens) runs here with a plain varlen
    reference: causal attention inside each run equals eager with the segment-id mask."""
    from megaponder.models.kernels import documents_cu_seqlens

    seg = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    cu, longest = documents_cu_seqlens(seg)
    assert cu.tolist() == [0, 5, 12, 24] and longest == 12 and cu.dtype == torch.int32
    q, k, v = _qkv()
    ref = attention(q, k, v, AttentionSpec(segment_ids=seg), backend="eager")
    packed = [x.transpose(1, 2).reshape(B * T, H, D) for x in (q, k, v)]
    out = torch.empty_like(packed[0])
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in packed)
        out[s:e] = attention(qs, ks, vs, AttentionSpec(), backend="eager")[0].transpose(0, 1)
    assert torch.allclose(out.view(B, T, H, D).transpose(1, 2), ref, atol=1e-6)
    assert documents_cu_seqlens(torch.tensor([[0, 0, 1, 0]]))[0] is None   # a returning id


class _FakeCuda:
    """Only .is_cuda/.dtype/.shape are read by the policy, so its CUDA branches run here."""

    def __init__(self, dtype, tq):
        self.is_cuda, self.dtype, self.shape = True, dtype, (B, H, tq, D)


def test_auto_policy_and_its_log(capsys):
    from megaponder.models import kernels

    specs = _specs()
    every = {"eager", "sdpa", "flex", "flash"}
    choose = kernels.choose_backend
    bf = torch.bfloat16
    assert choose(_FakeCuda(bf, T), specs["causal"][0], T, 0.0, every) == "flash"
    assert choose(_FakeCuda(bf, T), specs["causal"][0], T, 0.0, every - {"flash"}) == "sdpa"
    assert choose(_FakeCuda(bf, 4), specs["decode_last_4"][0], T, 0.0, every) == "flash"
    assert choose(_FakeCuda(bf, T), specs["documents"][0], T, 0.0, every) == "flash"
    assert choose(_FakeCuda(bf, T), specs["documents"][0], T, 0.0, every - {"flash"}) == "flex"
    assert choose(_FakeCuda(bf, T), specs["key_bias"][0], T, 0.0, every) == "flex"
    assert choose(_FakeCuda(bf, 3), specs["compacted_queries"][0], T, 0.0, every) == "flex"
    assert choose(_FakeCuda(bf, 3), specs["compacted_queries"][0], T, 0.1, every) == "sdpa"
    assert choose(_FakeCuda(torch.float32, T), specs["causal"][0], T, 0.0, every) == "sdpa"
    q, k, v = _qkv()
    assert choose(q, specs["key_bias"][0], T, 0.0, every) == "sdpa"   # CPU
    kernels.AUTO_CHOICES.clear()
    for _ in range(3):
        attention(q, k, v, specs["key_bias"][0], backend="auto")
    assert capsys.readouterr().err.count("attention auto: key_bias on cpu (float32) -> sdpa") == 1
