"""Checks run inside the gloo process groups of tests/test_parallel_dist.py.

Each check builds the single-device model with one seed (identical on every rank), keeps an
untouched copy as the reference, parallelizes the other and compares. Results are plain
floats so the parent test process makes the assertions (and prints useful numbers).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist


def tiny_config(tp=1, pp=1, zero=0, sp=False, family="vanilla"):
    from megaponder.config import Config, ModelConfig
    cfg = Config()
    # rotary_pct=1: with partial rotary the non-rotary part of the key bias has an exactly
    # zero gradient (softmax shift invariance) whose rounding noise Adam turns into +-lr
    # steps that differ between any two summation orders; full rotary removes that artefact.
    cfg.model = ModelConfig(family=family, vocab_size=200, make_vocab_size_divisible_by=8,
                            hidden_size=32, num_layers=2, num_heads=4,
                            max_position_embeddings=64, rotary_pct=1.0)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, zero
    cfg.parallel.sequence_parallel = sp
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 2, 2
    cfg.optim.lr, cfg.optim.grad_clip = 1e-2, 0.5   # clip active: tests the distributed norm
    return cfg


def _gather_tp(t, p, topo):
    if getattr(p, "tp_sharded", False) and topo.tp > 1:
        parts = [torch.empty_like(t) for _ in range(topo.tp)]
        dist.all_gather(parts, t.contiguous(), group=topo.tp_group)
        return torch.cat(parts, p.partition_dim)
    return t


def forward_backward_parity(topo, sp=False):
    """One forward/backward in float64: logits, loss and every gradient vs single device,
    plus the vocab-parallel CE and pondering embedding on their own."""
    from megaponder.models import build_model
    from megaponder.models.base import lm_cross_entropy
    from megaponder.parallel.parallelize import gather_full_state_dict, parallelize
    from megaponder.parallel.tensor import (gather_logits, vocab_parallel_cross_entropy,
                                            vocab_parallel_ponder_embedding)
    cfg = tiny_config(topo.tp, topo.pp, sp=sp)
    torch.manual_seed(0)
    ref = build_model(cfg).double()
    model = parallelize(copy.deepcopy(ref), cfg, topo)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 8), generator=g)
    tgt = torch.randint(0, 200, (2, 8), generator=g)
    tgt[0, :3] = -100
    out, r = model(ids, targets=tgt), ref(ids, targets=tgt)
    out.loss.backward()
    r.loss.backward()
    res = {"loss_rel": abs(out.loss.item() - r.loss.item()) / r.loss.item()}
    logits = gather_logits(out.logits, topo.tp_group)
    res["logits_abs"] = (logits - r.logits).abs().max().item()
    ref_p = dict(ref.named_parameters())
    res["grad_rel"] = max(
        ((_gather_tp(p.grad, p, topo) - ref_p[n].grad).abs().max()
         / ref_p[n].grad.abs().max().clamp(min=1e-30)).item()
        for n, p in model.named_parameters())
    # vocab-parallel primitives on random data
    x = torch.randn(3, 5, 200, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(200, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 200, (3, 5), generator=g)
    n, k = topo.tp, topo.tp_rank
    xl = x.detach().chunk(n, -1)[k].clone().requires_grad_()
    wl = w.detach().chunk(n, 0)[k].clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(xl, t, topo.tp_group)
    pe = vocab_parallel_ponder_embedding(xl, wl, topo.tp_group)
    (ce + pe.square().sum()).backward()
    ce_ref = lm_cross_entropy(x, t)
    pe_ref = torch.softmax(x, -1) @ w
    (ce_ref + pe_ref.square().sum()).backward()
    res["ce_rel"] = abs(ce.item() - ce_ref.item()) / ce_ref.item()
    res["pe_abs"] = (pe - pe_ref).abs().max().item()
    res["pe_grad_abs"] = max((xl.grad - x.grad.chunk(n, -1)[k]).abs().max().item(),
                             (wl.grad - w.grad.chunk(n, 0)[k]).abs().max().item())
    full = gather_full_state_dict(model, topo)
    if full is not None:
        sd = ref.state_dict()
        res["state_keys_equal"] = list(full) == list(sd)
        res["state_abs"] = max((full[k2] - sd[k2]).abs().max().item() for k2 in sd)
    return res


#: tiny per-family settings: every recurrent feature active (halting happens, Jacobi counts
#: vary between micro-batches, bottom-k loss and compute penalty on) at seq 8, d 32.
FAMILY_PONDER = {
    "ponderlm": {"steps": 2},
    "adaponderlm": {"steps": 2, "gate_bias_init": 0.0, "tau": 0.4},
    "ponderlm2": {"steps": 2, "jacobi_passes": [1, 2]},
    "ponderlm3": {"steps": 2, "jacobi_passes": [1, 2]},
    "loop": {"steps": 2},
    "pause": {"pause_tokens": 2},
    "fixed_pruning": {"steps": 2, "target_flops_ratio": 2.0},
    "random_halting": {"steps": 2, "halting_rate": 0.3},
}
FAMILIES = list(FAMILY_PONDER)
VOCAB = 128


def family_config(family, tp=1, pp=1, zero=0, sp=False, **ponder):
    cfg = tiny_config(tp, pp, zero, sp, family)
    cfg.model.vocab_size = VOCAB
    for k, v in {**FAMILY_PONDER.get(family, {}), **ponder}.items():
        setattr(cfg.ponder, k, v)
    return cfg


def training_parity(topo, zero, sp=False, steps=5, family="vanilla", ponder=None, cfg=None):
    """``steps`` DeepSpeed optimizer steps of the parallel model vs plain torch AdamW +
    clip_grad_norm_ on the single-device model, same data. The global batch of each step is
    dp*gas micro-batches; rank r's i-th micro-batch is global micro-batch i*dp + r (the
    trainer's interleaved sharding, megaponder/data/sampler.py), which is also the order in
    which the reference consumes them, so seeded draws (Jacobi counts, pruning plans) agree."""
    from megaponder.models import build_model
    from megaponder.train.engine import build_engine, param_groups
    from megaponder.parallel.parallelize import gather_full_state_dict, load_full_state_dict, parallelize
    from megaponder.train.guards import StopRequest
    from sync_count import SyncCounter
    if cfg is None:
        cfg = family_config(family, topo.tp, topo.pp, zero, sp, **(ponder or {}))
    torch.manual_seed(0)
    ref = build_model(cfg)
    model = parallelize(copy.deepcopy(ref), cfg, topo)
    keys = _state_dict_key_check(ref, model, topo)
    engine = build_engine(model, cfg, topo)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(ref, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    g = torch.Generator().manual_seed(1)
    mb, gas, dp = cfg.train.micro_batch_size, cfg.train.grad_accum_steps, topo.dp
    vocab = cfg.model.vocab_size
    losses, ref_losses, norms, syncs = [], [], [], []
    stop = StopRequest()   # the training loop's per-step stop check, counted with the step
    for step in range(steps):
        ids = torch.randint(0, vocab, (dp * gas, mb, 8), generator=g)
        tgt = torch.randint(0, vocab, (dp * gas, mb, 8), generator=g)
        tgt[:, 0, :2] = -100
        mine = [i * dp + topo.dp_rank for i in range(gas)]
        engine.step_count = step
        with SyncCounter() as counter:   # host reads of a step that logs nothing
            stats = engine.train_step([{"input_ids": ids[j], "targets": tgt[j]} for j in mine])
            stop.should_stop()
        syncs.append({**counter.by_origin(), "sites": counter.report()})
        losses.append(stats["loss"])   # a logging step's read, outside the count
        opt.zero_grad()
        ref.set_step(step)
        total = 0.0
        for j in range(dp * gas):
            loss = ref(ids[j], targets=tgt[j]).loss / (gas * dp)
            loss.backward()
            total += loss.item()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip).item()
        opt.step()
        ref_losses.append(total)
        norms.append((stats["grad_norm"], ref_norm))
    stop.close()
    res = {"syncs": syncs, "losses": losses, "ref_losses": ref_losses, "norms": norms, "keys": keys,
           "mean_iters": stats.get("mean_iters"), "passes": getattr(ref, "num_passes", None),
           # activation checkpointing applied to which modules ("layer"/"iteration" markers)
           "checkpointing": sorted({m._ckpt for m in model.modules() if getattr(m, "_ckpt", None)})}
    full = gather_full_state_dict(engine.module, topo)
    if full is not None:
        sd = ref.state_dict()
        diff = sum((full[k] - sd[k]).double().square().sum() for k in sd).sqrt()
        res["weights_rel_l2"] = (diff / sum(sd[k].double().square().sum() for k in sd).sqrt()).item()
        res["weights_max_abs"] = max((full[k] - sd[k]).abs().max().item() for k in sd)
        # for diagnosis when a tolerance trips: the tensor with the largest relative change
        res["worst_tensor"] = max(((((full[k] - sd[k]).norm() / sd[k].norm().clamp(min=1e-12)).item(), k)
                                   for k in sd))
    # round trip: shard the reference weights back in and gather them again
    if zero < 3:
        load_full_state_dict(engine.module, ref.state_dict(), topo)
        again = gather_full_state_dict(engine.module, topo)
        if again is not None:
            res["roundtrip_abs"] = max((again[k] - v).abs().max().item()
                                       for k, v in ref.state_dict().items())
    return res


def dropout_checks(topo, sp=False):
    """tp with attention dropout (and, under SP, hidden dropout): the masks come from the
    per-TP-rank stream (the default stream is left untouched, so replicated regions stay in
    step across TP ranks) and activation checkpointing, per layer and per iteration, replays
    them exactly (same loss and gradients as without checkpointing)."""
    from megaponder.models import build_model
    from megaponder.parallel.parallelize import parallelize
    from megaponder.parallel.state import RNG, seed_everything
    cfg = tiny_config(topo.tp, topo.pp, 0, sp)
    cfg.model.attention_dropout = 0.3
    cfg.model.hidden_dropout = 0.2 if sp else 0.0
    torch.manual_seed(0)
    ref = build_model(cfg)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    runs, out = {}, {}
    for granularity in ("none", "layer", "iteration"):
        cfg.parallel.activation_checkpointing = granularity
        model = parallelize(copy.deepcopy(ref), cfg, topo)
        model.train()
        seed_everything(7, topo)
        default_before, tp_before = torch.get_rng_state(), RNG.state_dict()["tp"]
        loss = model(ids, targets=ids).loss
        out["default_stream_untouched"] = torch.equal(default_before, torch.get_rng_state())
        out["tp_stream_advanced"] = not torch.equal(tp_before, RNG.state_dict()["tp"])
        loss.backward()
        runs[granularity] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    base_loss, base_grads = runs["none"]
    out["ckpt_loss_rel"] = max(abs(l - base_loss) / abs(base_loss) for l, _ in runs.values())
    out["ckpt_grad_rel"] = max(((g[n] - base_grads[n]).norm() / base_grads[n].norm().clamp(min=1e-30)).item()
                               for _, g in runs.values() for n in base_grads)
    # dropout is on: the loss differs from the same weights in eval mode
    model.eval()
    with torch.no_grad():
        out["eval_loss"] = model(ids, targets=ids).loss.item()
    out["train_loss"] = base_loss
    return out


def _state_dict_key_check(ref, model, topo) -> str | None:
    """None when the parallel wrappers kept the single-device names: this rank's state-dict
    keys are the single-device keys in the same order, minus the layers of other pipeline
    stages, and every parameter name is one of them; else what differs. With tp the stack
    and (with attention dropout) attention show as their wrapper modules in print(model)."""
    from megaponder.parallel.pipeline import stage_layers
    owned = set(stage_layers(len(ref.stack.layers), topo.pp, topo.pp_rank))
    others = tuple(f"stack.layers.{i}." for i in range(len(ref.stack.layers)) if i not in owned)
    want = [k for k in ref.state_dict() if not k.startswith(others)]
    got = list(model.state_dict())
    if got != want:
        return f"state_dict keys {sorted(set(got) ^ set(want))[:6]} (or order) differ"
    stray = [k for k, _ in model.named_parameters() if k not in set(want)]
    if stray:
        return f"parameter names not in the state dict: {stray[:6]}"
    if topo.tp > 1 and "TensorParallelStack" not in repr(model):
        return "print(model) does not show the TensorParallelStack wrapper"
    return None


def run_checks(rank, world, plan):
    """plan: list of (name, kind, tp, pp, zero, sp); returns {name: result}."""
    from megaponder.parallel.state import build_topology, seed_everything
    out = {}
    for name, kind, tp, pp, zero, sp in plan:
        topo = build_topology(tp, pp, sp)
        seed_everything(1234, topo)
        if kind == "fwd":
            out[name] = forward_backward_parity(topo, sp)
        elif kind == "dropout":
            out[name] = dropout_checks(topo, sp)
        else:
            out[name] = training_parity(topo, zero, sp)
        out[name]["topology"] = topo.describe()
    return out


def _set(cfg, dotted, value):
    section, key = dotted.split(".")
    setattr(getattr(cfg, section), key, value)


def bf16_training(topo, family, steps=3):
    """tp layout, DeepSpeed bf16 (fp32 master weights) vs the same layout in fp32, ``steps``
    steps on ONE repeated batch (so the loss must fall). Returns both loss curves."""
    from megaponder.models import build_model
    from megaponder.train.engine import build_engine
    from megaponder.parallel.parallelize import parallelize
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (4, 8), generator=g)
    tgt = torch.randint(0, VOCAB, (4, 8), generator=g)
    out = {}
    for precision in ("bf16", "fp32"):
        cfg = family_config(family, topo.tp, topo.pp, 1)
        cfg.train.precision = precision
        torch.manual_seed(0)
        model = parallelize(build_model(cfg), cfg, topo)
        engine = build_engine(model, cfg, topo)
        losses = []
        for step in range(steps):
            engine.step_count = step
            losses.append(engine.train_step({"input_ids": ids, "targets": tgt})["loss"])
        out[f"{precision}_losses"] = losses
    return out


def run_family_checks(rank, world, layouts, families=None, steps=5, extra=(), bf16_families=()):
    """layouts: list of (name, tp, pp, zero); every family of ``families`` (default: all
    pondering families) is trained ``steps`` optimizer steps in every layout, in ONE process
    group (one spawn for the whole matrix). ``extra``: (name, tp, pp, zero, families,
    {"section.key": value}) layouts with config overrides (activation checkpointing).
    ``bf16_families``: a tp=world bf16 run each (:func:`bf16_training`, key "bf16_tp2").
    Returns {layout: {family: result}}; a failing family records its traceback instead of
    stopping the others."""
    import time
    import traceback
    from megaponder.parallel.state import build_topology, seed_everything
    out = {}
    jobs = [(name, tp, pp, zero, families or FAMILIES, {}) for name, tp, pp, zero in layouts]
    jobs += list(extra)
    if bf16_families:
        jobs.append(("bf16_tp2", world, 1, 1, list(bf16_families), "bf16"))
    topos = {}
    for name, tp, pp, zero, fams, overrides in jobs:
        sp = isinstance(overrides, dict) and overrides.get("parallel.sequence_parallel", False)
        if (tp, pp, sp) not in topos:
            topos[(tp, pp, sp)] = build_topology(tp, pp, sp)
        topo = topos[(tp, pp, sp)]
        out[name] = {}
        for family in fams:
            seed_everything(1234, topo)
            t0 = time.time()
            try:
                if overrides == "bf16":
                    res = bf16_training(topo, family)
                else:
                    ponder = ({"kv_reuse_grad": False} if pp > 1 and family == "adaponderlm"
                              and not PP_KV_REUSE_GRAD else {})
                    cfg = family_config(family, tp, pp, zero, **ponder)
                    for k, v in overrides.items():
                        _set(cfg, k, v)
                    res = training_parity(topo, zero, steps=steps, family=family, cfg=cfg)
            except Exception:  # noqa: BLE001 - report per family
                res = {"error": traceback.format_exc()}
            res["seconds"] = time.time() - t0
            res["topology"] = topo.describe()
            out[name][family] = res
            dist.barrier()
    return out


#: adaponderlm under pp trains with gradient through the reused K/V (routed inside the
#: pipeline, see megaponder/parallel/pipeline.py); False would fall back to kv_reuse_grad=false.
PP_KV_REUSE_GRAD = True
