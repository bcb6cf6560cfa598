"""KV-cached generation for every family agrees with recomputing the whole prefix."""
import pytest
import torch

from megaponder.infer import generate
from megaponder.models.decoders import decode_logits, generate_cached, make_decoder
from test_families_helpers import ALL_FAMILIES, force_ada_gates, real_batch, tiny


def greedy_uncached(model, prompt, n, **kw):
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(ids, **kw).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "random_halting"])
def test_greedy_cached_equals_uncached(family):
    model = tiny(family, backend="sdpa").eval()
    prompt = real_batch(1, 8)[0][0].tolist()
    if family == "adaponderlm":
        force_ada_gates(model, torch.tensor([prompt]), frac=0.3)
    kw = {"jacobi_passes": 40} if family in ("ponderlm2", "ponderlm3") else {}
    cached = generate(model, prompt, max_new_tokens=6, temperature=0.0)  # uses generate_cached
    assert cached == greedy_uncached(model, prompt, 6, **kw)


def test_sampling_is_seeded_and_respects_vocab():
    model = tiny("random_halting", backend="sdpa", halting_rate=0.3).eval()
    prompt = real_batch(1, 6)[0][0].tolist()
    a = generate_cached(model, prompt, max_new_tokens=5, temperature=1.0, vocab_size=200, seed=3)
    b = generate_cached(model, prompt, max_new_tokens=5, temperature=1.0, vocab_size=200, seed=3)
    assert a == b and all(t < 200 for t in a)


def test_adaponderlm_decoder_computes_fewer_rows_and_keeps_caches():
    model = tiny("adaponderlm", steps=3).eval()
    ids, _ = real_batch(1, 12)
    force_ada_gates(model, ids, frac=0.4)
    dec = make_decoder(model)
    dec.feed(ids[:, :7])
    dec.feed(ids[:, 7:])
    act = dec.executed()
    assert act.shape == (4, 1, 12) and act[1:].float().mean() < 1.0
    # every iteration's cache holds every token (halted ones via their reused K/V)
    assert all(layer[0].shape[2] == 12 for cache in dec.caches for layer in cache)
    assert (decode_logits(model, ids) - model(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["adaponderlm", "fixed_pruning", "ponderlm", "loop"])
def test_batched_decoding_equals_row_by_row(family):
    """Cross-row compaction: all rows in lockstep give each row's own logits (1e-5), token by
    token and as one prefill; halting rows really skip work (fewer slots than dense)."""
    model = tiny(family, steps=3).eval()
    ids, _ = real_batch(3, 10)
    if family == "adaponderlm":
        force_ada_gates(model, ids, frac=0.4)
    for chunk in (None, 1, 4):
        rows = torch.cat([decode_logits(model, ids[b:b + 1], chunk=chunk) for b in range(3)])
        logits, views = decode_logits(model, ids, chunk=chunk, return_decoders=True)
        if family != "fixed_pruning":   # its decoder draws priorities per batch, not per row
            assert (logits - rows).abs().max().item() < 1e-5, chunk
            assert (logits - model(ids).logits).abs().max().item() < 1e-5, chunk
        dec = views[0].decoder
        assert dec.executed().shape == (model.num_passes, 3, 10)
        assert dec.computed_slots >= dec.active_slots == int(dec.executed().sum())
        if family in ("adaponderlm", "fixed_pruning"):
            assert dec.active_slots < model.num_passes * 3 * 10


@pytest.mark.parametrize("readout", ["last_active", "final"])
def test_token_step_row_buckets_equal_the_forward(readout):
    """The one-token step runs passes 1..P-1 on the continuing rows only, padded to a power of
    two on CUDA (padding rows computed on the scratch row and discarded) or the exact count
    (CPU default): both give the training forward's logits (1e-5) and halting pattern on 6
    rows whose continuing counts vary per token (so 3 rows get padded to 4, 5 to all 6), and
    with the CPU default that runs all rows (the halted ones by ``where``) once more than
    half of them continue."""
    model = tiny("adaponderlm", steps=3, halted_readout=readout).eval()
    ids, _ = real_batch(6, 12)
    force_ada_gates(model, ids, frac=0.4)
    ref = model(ids, return_token_stats=True)
    slots = {}
    # (pad to a power of two, compact_fraction): CPU's default; always gather; CUDA's buckets
    for setting in ((False, 0.5), (False, 1.0), (True, 0.5)):
        dec = make_decoder(model)
        dec.pad_to_power_of_two, dec.compact_fraction = setting
        logits = torch.cat([dec.feed(ids[:, :4])] + [dec.feed(ids[:, j:j + 1]) for j in range(4, 12)], 1)
        assert (logits - ref.logits).abs().max().item() < 1e-5, setting
        assert torch.equal(dec.executed().sum(0).float(), ref.stats["token_iterations"])
        slots[setting] = dec.computed_slots
    # gathering only the continuing rows computes fewer slots than running all rows when
    # more than half continue; padding to powers of two computes more than the exact count
    assert slots[(False, 1.0)] < slots[(False, 0.5)] and slots[(False, 1.0)] < slots[(True, 0.5)]
