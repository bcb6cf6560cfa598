"""The staggered decoder (megaponder/models/staggered.py: every batch row at its own pass)
against the lockstep compacting decoder (models/decoders.py).

Tolerance 1e-5 (fp32): both run the same per-token operations; what differs is the key range
of the attention (the staggered tick attends to a bound on the furthest row's slot, the keys
past a row's own slot masked to weight exactly 0) and the gate matmuls (every gate in one
matmul), i.e. float32 reassociation, ~1e-7 relative on O(1) logits. The forced gates sit far
from tau (test_families_helpers.force_ada_gates), so no halting decision can flip."""
import pytest
import torch

from megaponder.infer import generate, generate_batch
from megaponder.models.decoders import VerticalDecoder, make_decoder
from megaponder.models.staggered import LOCKSTEP_ABOVE_ACTIVE, StaggeredDecoder, choose_decoder
from test_families_helpers import force_ada_gates, real_batch, tiny

TOL = 1e-5
FAMILIES = [("vanilla", "neox", {}), ("ponderlm", "llama", {}), ("adaponderlm", "neox", {}),
            ("adaponderlm", "llama", {"halted_readout": "final"}),
            ("random_halting", "neox", {"halting_rate": 0.4})]


def model_for(family, backbone, **ponder):
    model = tiny(family, backend="sdpa", backbone=backbone, steps=3, **ponder).eval()
    if family == "adaponderlm":
        force_ada_gates(model, real_batch(3, 16)[0], frac=0.35)
    return model


def teacher_forced(ids, prompt):
    """next_token for decode(): the next id of each row of ``ids`` after ``prompt``."""
    prompt = torch.as_tensor(prompt).expand(ids.shape[0])   # an int or per-row lengths
    return lambda logits, done, rows: ids[rows, (prompt[rows] + done + 1).clamp_max(ids.shape[1] - 1)]


@pytest.mark.parametrize("family, backbone, ponder, cpu_policies",
                         [(*f, None) for f in FAMILIES] + [(*f, False) for f in FAMILIES[2:5]])
def test_staggered_decoder_equals_lockstep_decoder(family, backbone, ponder, cpu_policies):
    """3 rows, a 6-token prompt, then 10 tokens fed one at a time: the same logits and the
    same (pass, token) activity as the lockstep decoder fed the same tokens; and no tick is
    wasted: the ticks are the passes of the row with the most (plus, for the final readout,
    one re-reading tick per token that halted early). Under the defaults on CPU (the gates of
    the deciding rows' range of passes; finished rows dropped at each round's read, here
    every 2 ticks) and under the accelerators' policies (every gate, every row every tick)."""
    model = model_for(family, backbone, **ponder)
    ids, _ = real_batch(3, 16)
    lockstep = make_decoder(model)
    expected = [lockstep.feed(ids[:, :6])] + [lockstep.feed(ids[:, j:j + 1]) for j in range(6, 16)]
    staggered = StaggeredDecoder(model)
    if cpu_policies is not None:
        staggered.gates_in_range = staggered.drop_finished_rows = cpu_policies
    staggered.ticks_per_read = 2
    last = staggered.prefill(ids[:, :6], 10)
    tokens, logits = staggered.decode(ids[:, 6], 10, teacher_forced(ids, 6), keep_logits=True)
    assert (last - expected[0][:, -1]).abs().max().item() < TOL
    assert (logits - torch.cat(expected[1:], 1)).abs().max().item() < TOL
    assert torch.equal(tokens[:, :10], ids[:, 6:])
    activity = lockstep.executed()[:, :, 6:]
    assert torch.equal(staggered.executed(), activity)
    per_row = activity.sum(dim=(0, 2))
    if ponder.get("halted_readout") == "final":   # a token halted before the last pass re-reads
        per_row = per_row + (~activity[-1]).sum(-1)
    assert staggered.ticks == int(per_row.max())
    with pytest.raises(RuntimeError, match="once per prefill"):
        staggered.decode(ids[:, 6], 10, teacher_forced(ids, 6))
    if cpu_policies is False:
        assert staggered.computed_slots == 3 * staggered.ticks
    else:   # every row until the read after its last tick, then no more
        assert staggered.computed_slots == sum(min(staggered.ticks, -(-int(n) // 2) * 2) for n in per_row)
    if family in ("adaponderlm", "random_halting"):   # rows really sat at different passes
        assert staggered.ticks < model.num_passes * 10
        assert len(set(per_row.tolist())) > 1, per_row


@pytest.mark.parametrize("family, ponder", [("adaponderlm", {}), ("random_halting", {"halting_rate": 0.4})])
def test_prompts_of_different_lengths_need_no_padding(family, ponder):
    """Prompts of 3, 9 and 5 tokens decoded together, greedy: row b's tokens are those a
    one-row lockstep decoder gives it alone (drawing the schedule of batch row b)."""
    model = model_for(family, "neox", **ponder)
    ids, _ = real_batch(3, 16)
    prompts = [ids[0, :3], ids[1, :9], ids[2, :5]]
    staggered = StaggeredDecoder(model)
    first = staggered.prefill(prompts, 6).argmax(-1)
    tokens = staggered.decode(first, 6, lambda logits, done, rows: logits.argmax(-1))
    for b, prompt in enumerate(prompts):
        alone = VerticalDecoder(model)
        alone.draw_rows = torch.tensor([b])
        logits, expected = alone.feed(prompt.view(1, -1)), []
        for _ in range(7):
            expected.append(int(logits[0, -1].argmax()))
            logits = alone.feed(torch.tensor([[expected[-1]]]))
        assert tokens[b].tolist() == expected, b


@pytest.mark.parametrize("family, backbone, ponder", FAMILIES)
@pytest.mark.parametrize("lengths", [(0, 5, 0), (0, 0, 0)])
def test_empty_prompts_start_at_slot_zero(family, backbone, ponder, lengths):
    """Rows with no prompt token (some rows, and the whole batch): an empty cache, the first
    fed token at position 0. Every fed token's logits and (pass, token) activity are those of
    a one-row lockstep decoder fed the same tokens (its first feed: that one token), and
    prefill's logits of an empty row are NaN (nothing to predict from)."""
    model = model_for(family, backbone, **ponder)
    ids, _ = real_batch(3, 16)
    steps = 6
    staggered = StaggeredDecoder(model)
    last = staggered.prefill([ids[b, :n] for b, n in enumerate(lengths)], steps)
    first = torch.stack([ids[b, n] for b, n in enumerate(lengths)])
    _, logits = staggered.decode(first, steps, teacher_forced(ids, torch.tensor(lengths)), keep_logits=True)
    for b, n in enumerate(lengths):
        alone = VerticalDecoder(model)
        alone.draw_rows = torch.tensor([b])   # the plan of batch row b, as the staggered row
        if n:
            assert (last[b] - alone.feed(ids[b:b + 1, :n])[0, -1]).abs().max().item() < TOL
        else:
            assert last[b].isnan().all()
        expected = torch.cat([alone.feed(ids[b:b + 1, j:j + 1]) for j in range(n, n + steps)], 1)[0]
        assert (logits[b] - expected).abs().max().item() < TOL, b
        assert torch.equal(staggered.executed()[:, b], alone.executed()[:, 0, n:]), b


def test_generate_batch_refuses_an_empty_prompt():
    """generate_batch picks the first new token from the prompt's last logits: none for an
    empty prompt (prefill's NaN row), so it refuses one."""
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_batch(model_for("vanilla", "neox"), [[1, 2], []], 3, temperature=0)


def test_draw_rows_zero_draws_every_row_as_a_lone_row():
    """``draw_rows`` all 0 (random_halting): every row, in the prefill (prompts of one length:
    one lockstep batch; of different lengths: row by row) and in the ticks, draws the halting
    plan a one-row decoder draws, so its logits and activity are that decoder's."""
    model = model_for("random_halting", "neox", halting_rate=0.4)
    ids, _ = real_batch(3, 16)
    for lengths in ((6, 6, 6), (3, 9, 5)):
        staggered = StaggeredDecoder(model)
        staggered.draw_rows = torch.zeros(3, dtype=torch.long)
        last = staggered.prefill([ids[b, :n] for b, n in enumerate(lengths)], 6)
        _, logits = staggered.decode(torch.stack([ids[b, n] for b, n in enumerate(lengths)]), 6,
                                     teacher_forced(ids, torch.tensor(lengths)), keep_logits=True)
        for b, n in enumerate(lengths):
            alone = VerticalDecoder(model)   # a lone row: draws as row 0
            assert (last[b] - alone.feed(ids[b:b + 1, :n])[0, -1]).abs().max().item() < TOL
            expected = torch.cat([alone.feed(ids[b:b + 1, j:j + 1]) for j in range(n, n + 6)], 1)[0]
            assert (logits[b] - expected).abs().max().item() < TOL, (lengths, b)
            prompt_acts = (staggered.prompt_decoder.executed()[:, b] if staggered.prompt_decoder
                           else staggered._prompt_decoders[b].executed()[:, 0])
            assert torch.equal(prompt_acts, alone.executed()[:, 0, :n]), (lengths, b)
            assert torch.equal(staggered.executed()[:, b], alone.executed()[:, 0, n:]), (lengths, b)


def test_staggered_decoder_reads_the_host_once_per_round():
    """Host reads (tests/sync_count.py) over a whole decode, with the accelerators' policies
    (every gate, every row every tick): one per round of ``ticks_per_read`` ticks (is every
    row done, how far the furthest got), none per tick; fewer than one per generated token.
    CPU's defaults add exactly one per tick (which passes decide, ``gates_in_range``), a read
    of a CPU tensor, which stalls nothing; dropping finished rows rides on the round's read."""
    from sync_count import SyncCounter
    model = model_for("adaponderlm", "neox")
    ids, _ = real_batch(3, 16)
    rounds_read = {}
    for accelerator in (True, False):
        staggered = StaggeredDecoder(model)
        staggered.ticks_per_read = 4
        if accelerator:
            staggered.gates_in_range = staggered.drop_finished_rows = False
        first = staggered.prefill(ids[:, :6], 10).argmax(-1)
        with SyncCounter() as syncs:
            staggered.decode(first, 10, lambda logits, done, rows: logits.argmax(-1))
        rounds_read[accelerator] = syncs.count - (not accelerator) * staggered.ticks
        rounds = -(-staggered.ticks // 4)
        assert 1 <= rounds_read[accelerator] <= rounds + 1, syncs.report()
    assert rounds_read[True] < 3 * 10 / 4, rounds_read


def test_generate_batch_equals_generate_greedy_and_stops_at_eos():
    """generate_batch (staggered or lockstep for the vertical families, one prompt at a time
    otherwise) gives each prompt its greedy generate() tokens; a row stops after eos (kept)
    while the others go on."""
    ids, _ = real_batch(3, 16)
    ragged = [ids[0, :4].tolist(), ids[1, :8].tolist(), ids[2, :6].tolist()]
    same = [ids[b, :6].tolist() for b in range(3)]
    models = {family: model_for(family, "neox") for family in ("ponderlm2", "adaponderlm")}
    for family, model in models.items():
        alone = [generate(model, p, 6, temperature=0) for p in ragged]
        assert generate_batch(model, ragged, 6, temperature=0) == alone, family
    model = models["adaponderlm"]
    alone = [generate(model, p, 6, temperature=0) for p in same]
    for decoder in ("staggered", "lockstep", "auto"):
        assert generate_batch(model, same, 6, temperature=0, decoder=decoder) == alone, decoder
    eos = alone[1][2]   # row 1 stops at its third token; rows that never emit it go on
    expected = [generate(model, p, 12, temperature=0, eos_id=eos) for p in same]
    assert len(expected[1]) == 3 and max(map(len, expected)) == 12
    for decoder in ("staggered", "lockstep"):   # 12 tokens: past the lockstep loop's first stop check
        assert generate_batch(model, same, 12, temperature=0, eos_id=eos, decoder=decoder) == expected, decoder
    with pytest.raises(ValueError, match="prompts of one length"):
        generate_batch(model, ragged, 6, decoder="lockstep")


def test_auto_decodes_in_lockstep_only_where_halting_is_rare():
    """The "auto" rule: staggered for prompts of different lengths and where the prompts'
    active slots are below LOCKSTEP_ABOVE_ACTIVE; lockstep where (almost) nothing halts."""
    model = model_for("adaponderlm", "neox")   # forced gates: many slots halt
    ids, _ = real_batch(3, 16)

    def prefilled(prompts):
        decoder = StaggeredDecoder(model)
        decoder.prefill(prompts, 4)
        return decoder

    halting = prefilled(ids[:, :12])
    assert halting.prompt_activity() < LOCKSTEP_ABOVE_ACTIVE
    assert choose_decoder(halting) == "staggered"
    assert choose_decoder(prefilled([ids[0, :5], ids[1, :9]])) == "staggered"
    tau = model.ponder_cfg.tau
    model.ponder_cfg.tau = 0.0   # no token halts
    try:
        dense = prefilled(ids[:, :12])
    finally:
        model.ponder_cfg.tau = tau
    assert dense.prompt_activity() == 1.0 and choose_decoder(dense) == "lockstep"


def test_lockstep_at_high_activity_does_no_more_work_than_no_halting():
    """Where "auto" keeps the lockstep decoder (>= LOCKSTEP_ABOVE_ACTIVE of the slots active),
    halting must not cost more than no halting: over the same 8 rows and 10 fed tokens, the
    decoder at ~90% active slots calls no aten op more often than at tau = 0 (it runs all
    rows with `where` while more than half go on pondering, and skips what it can). The
    speed itself is measured in benchmarks/bench_decode.py; this pins the work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func] = self.counts.get(func, 0) + 1
            return func(*args, **(kwargs or {}))

    model = tiny("adaponderlm", backend="sdpa", steps=3).eval()
    ids, _ = real_batch(8, 16)
    force_ada_gates(model, ids, frac=0.05)

    def decode(tau):
        model.ponder_cfg.tau, saved = tau, model.ponder_cfg.tau
        try:
            decoder = make_decoder(model)
            decoder.feed(ids[:, :6])
            with OpCounter() as ops:
                for j in range(6, 16):
                    decoder.feed(ids[:, j:j + 1])
            return ops.counts, decoder.executed()[:, :, 6:].float().mean().item()
        finally:
            model.ponder_cfg.tau = saved

    halting, active = decode(model.ponder_cfg.tau)
    dense, _ = decode(0.0)
    assert LOCKSTEP_ABOVE_ACTIVE <= active < 1.0, active
    more = {str(op): (n, dense.get(op, 0)) for op, n in halting.items() if n > dense.get(op, 0)}
    assert not more, more


def test_staggered_decoder_refuses_latent_and_loop_families():
    for family in ("loop", "ponderlm2"):
        with pytest.raises(ValueError, match="staggered decoding needs"):
            StaggeredDecoder(tiny(family, steps=2))
