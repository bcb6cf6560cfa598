"""The static-shape decoder (megaponder/models/static_cache.py) against the compacting one.

Tolerance 1e-5 (fp32): both decoders run the same per-token operations; what differs is the
row count of each matmul (every token of the batch vs the packed active ones) and the
attention's key length (T_max slots, the unwritten ones at weight exactly 0), i.e. float32
reassociation, ~1e-7 relative on O(1) logits. The forced gates sit far from tau
(test_families_helpers.force_ada_gates), so no halting decision can flip either way."""
import pytest
import torch
import torch._dynamo

from megaponder.infer import generate
from megaponder.models.decoders import make_decoder
from megaponder.models.static_cache import cache_length, make_static_decoder
from megaponder.models.spec import MissingCapability
from test_families_helpers import force_ada_gates, real_batch, tiny

TOL = 1e-5


def model_for(family, backbone, **ponder):
    model = tiny(family, backend="sdpa", backbone=backbone, steps=3, **ponder).eval()
    if family == "adaponderlm":
        force_ada_gates(model, real_batch(3, 16)[0], frac=0.35)
    return model


def decode(decoder, prompt, n, attention_mask=None, forced=None):
    """Logits [B, T, V] of a prompt, then of ``forced`` tokens fed one at a time, then of n
    greedy steps; and the greedy tokens [B, n]."""
    logits = [decoder.feed(prompt) if attention_mask is None else decoder.feed(prompt, attention_mask)]
    for j in range(0 if forced is None else forced.shape[1]):
        logits.append(decoder.feed(forced[:, j:j + 1]))
    tokens = []
    for _ in range(n):
        tokens.append(logits[-1][:, -1:].argmax(-1))
        logits.append(decoder.feed(tokens[-1]))
    return torch.cat(logits, 1), torch.cat(tokens, 1)


@pytest.mark.parametrize("family, backbone, ponder", [
    ("vanilla", "neox", {}), ("ponderlm", "llama", {}),
    ("adaponderlm", "neox", {}), ("adaponderlm", "llama", {"halted_readout": "final"}),
    ("random_halting", "neox", {"halting_rate": 0.4})])
def test_static_decoder_equals_compacting_decoder(family, backbone, ponder):
    """A batch of 3 rows (a prompt, teacher-forced tokens one at a time, greedy steps): the
    same logits, greedy tokens and halting pattern as the compacting decoder."""
    model = model_for(family, backbone, **ponder)
    ids, _ = real_batch(3, 16)
    static, dynamic = make_static_decoder(model, 3, 21), make_decoder(model)
    s_logits, s_tokens = decode(static, ids[:, :6], 5, forced=ids[:, 6:])
    d_logits, d_tokens = decode(dynamic, ids[:, :6], 5, forced=ids[:, 6:])
    assert torch.equal(s_tokens, d_tokens)
    assert (s_logits - d_logits).abs().max().item() < TOL
    assert torch.equal(static.executed(), dynamic.executed())
    if family in ("adaponderlm", "random_halting"):   # tokens really halted at different passes
        act = static.executed().float().mean(dim=(1, 2))
        assert 0.0 < act[-1] < act[1] < 1.0, act
    assert static.computed_slots == static.passes * 3 * 21 >= static.active_slots


@pytest.mark.parametrize("family, backbone, ponder", [
    ("adaponderlm", "llama", {}), ("ponderlm", "neox", {}), ("random_halting", "neox", {"halting_rate": 0.4})])
def test_left_padded_batch_gives_each_row_its_own_tokens(family, backbone, ponder):
    """Prompts of 12, 7 and 4 tokens left-padded into one static batch: row r's logits and
    greedy tokens are those the compacting decoder gives the same prompt as row r of an
    unpadded batch (positions count real tokens only, padding slots are never visible; the
    schedule baselines draw per row index, gate families do not depend on it)."""
    model = model_for(family, backbone, **ponder)
    ids, _ = real_batch(3, 12)
    lengths = [12, 7, 4]
    padded = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for r, n in enumerate(lengths):
        padded[r, 12 - n:], mask[r, 12 - n:] = ids[r, :n], True
    static = make_static_decoder(model, 3, 17)
    logits, tokens = decode(static, padded, 5, mask)
    for r, n in enumerate(lengths):
        row_logits, row_tokens = decode(make_decoder(model), ids[r:r + 1, :n].expand(r + 1, n), 5)
        assert torch.equal(tokens[r], row_tokens[r]), r
        assert (logits[r, 12 - n:] - row_logits[r]).abs().max().item() < TOL, r
    assert not static.executed()[:, :, :12][:, ~mask].any()   # padding counts as no work


def test_compiled_step_equals_eager_and_compiles_once():
    """torch.compile(fullgraph=True, dynamic=False) of the one-token step: the eager step's
    logits (the same aten ops; AOT autograd's functionalization only turns the in-place cache
    writes into copies), one graph for every decode step, and a second decoder of the same
    shapes reuses it. aot_eager: Dynamo + AOT tracing without Inductor's C++ build (minutes on
    2 cores); benchmarks/bench_decode.py --static runs Inductor."""
    model = tiny("adaponderlm", backend="sdpa", steps=2, layers=1).eval()   # a small graph
    ids, _ = real_batch(2, 10)
    force_ada_gates(model, ids, frac=0.35)
    eager = make_static_decoder(model, 2, 12)
    ref = [eager.feed(ids[:, :6])] + [eager.feed(ids[:, j:j + 1]) for j in range(6, 10)]
    compiled = make_static_decoder(model, 2, 12, compile=True, compile_backend="aot_eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = [compiled.feed(ids[:, :6]), compiled.feed(ids[:, 6:7])]   # the first step compiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        out += [compiled.feed(ids[:, j:j + 1]) for j in range(7, 10)]
        again = make_static_decoder(model, 2, 12, compile=True, compile_backend="aot_eager")
        again.feed(ids[:, :6])
        assert (again.feed(ids[:, 6:7]) - ref[1]).abs().max().item() < TOL
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert (torch.cat(out, 1) - torch.cat(ref, 1)).abs().max().item() < TOL
    assert torch.equal(compiled.executed(), eager.executed())


def test_generate_with_static_cache_and_refusals():
    model = model_for("adaponderlm", "neox")
    prompt = real_batch(1, 8)[0][0].tolist()
    assert generate(model, prompt, 6, temperature=0.0, static_cache=True) == \
        generate(model, prompt, 6, temperature=0.0)
    # loop and the latent families keep their dynamic decoders: one line naming the capability
    for family in ("loop", "ponderlm2", "pause"):
        with pytest.raises(MissingCapability, match=rf"'{family}' does not support static_decoder"):
            generate(tiny(family).eval(), prompt, 2, static_cache=True)
    dec = make_static_decoder(model, 1, 8)
    dec.feed(torch.tensor([prompt[:6]]))
    with pytest.raises(ValueError, match="holds 8 slots; 6 used, 3 more fed"):
        dec.feed(torch.tensor([prompt[:3]]))
    with pytest.raises(ValueError, match="built for batch 1, fed 2 rows"):
        dec.feed(torch.zeros(2, 1, dtype=torch.long))
    # compiled steps share a graph across prompts of similar length
    assert [cache_length(n, True) for n in (1, 64, 65, 300)] == [64, 64, 128, 512]
    assert cache_length(65, False) == 65


@pytest.mark.parametrize("family, ponder", [
    ("vanilla", {}), ("ponderlm", {}), ("adaponderlm", {}), ("adaponderlm", {"halted_readout": "final"}),
    ("random_halting", {"halting_rate": 0.4}), ("ponderlm2", {}), ("ponderlm3", {})])
def test_decoders_read_the_host_at_most_once_per_token(family, ponder):
    """Host reads (tests/sync_count.py) while 5 greedy tokens are decoded one at a time after
    a prompt, the greedy choice made on the device: the static-shape decoder reads nothing
    until the caller asks for the results (halting applied with ``where``); the compacting
    decoder at most once per token (the halting families: how many rows go on pondering,
    which sets the shapes of passes 1..P-1; PonderLM-3: how many steps the router keeps),
    never for the fixed-depth families."""
    from sync_count import SyncCounter
    latent = family in ("ponderlm2", "ponderlm3")
    model = model_for(family, "neox", **ponder)
    ids, _ = real_batch(1 if latent else 3, 16)
    decoders = {"dynamic": make_decoder(model)}
    if not latent:
        decoders["static"] = make_static_decoder(model, 3, 16)
    counts = {}
    for name, decoder in decoders.items():
        logits = decoder.feed(ids[:, :6])
        with SyncCounter() as syncs:
            for _ in range(5):
                logits = decoder.feed(logits[:, -1:].argmax(-1))
        counts[name] = syncs
    if not latent:
        assert counts["static"].count == 0, counts["static"].report()
    budget = 5 if family in ("adaponderlm", "random_halting", "ponderlm3") else 0
    assert counts["dynamic"].count <= budget, counts["dynamic"].report()
