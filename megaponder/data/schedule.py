"""How many samples a run asks for — one definition shared by the trainer and the data tools.

The sample order depends on ``num_train_samples`` (the epoch count and the shuffle are derived
from it), so ``tools/inspect_dataset.py`` and ``tools/build_index_cache.py`` must compute it
exactly as the trainer does. Both call :func:`run_num_samples`.
"""
from __future__ import annotations


def global_batch_size(micro_batch_size: int, dp_size: int, grad_accum_steps: int) -> int:
    return micro_batch_size * dp_size * grad_accum_steps


def grad_accum_for(train_cfg, dp_size: int) -> int:
    """``train.grad_accum_steps``, derived from ``train.global_batch_size`` when that is set
    (Megatron's convention: global = micro_batch_size x dp x grad_accum_steps)."""
    gbs, mbs = train_cfg.global_batch_size, train_cfg.micro_batch_size
    if gbs is None:
        return train_cfg.grad_accum_steps
    per_step = mbs * dp_size
    if gbs <= 0 or gbs % per_step:
        raise ValueError(batch_mismatch_message(gbs, mbs, dp_size))
    return gbs // per_step


def batch_mismatch_message(gbs: int, mbs: int, dp_size: int) -> str:
    """One line naming the values that would work."""
    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []
    per_step = mbs * dp_size
    near = sorted({max(per_step, gbs // per_step * per_step), (gbs // per_step + 1) * per_step})
    hints = [f"train.global_batch_size a multiple of {per_step} (e.g. {' or '.join(map(str, near))})"]
    if gbs % dp_size == 0:
        hints.append(f"train.micro_batch_size one of {divisors(gbs // dp_size)[:8]}")
    if gbs % mbs == 0:
        hints.append(f"a data-parallel size (world / (tp*pp)) among {divisors(gbs // mbs)[:8]}")
    return (f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x dp = "
            f"{mbs} x {dp_size} = {per_step}; set " + ", or ".join(hints) + ".")


def run_num_samples(cfg, dp_size: int) -> tuple[int, int]:
    """(num_train_samples, num_valid_samples) for a resolved ``Config`` on ``dp_size`` ranks.

    train: ``train.steps × global batch``. valid: ``eval_batches × micro_batch × dp`` per
    evaluation, one evaluation every ``eval_every`` steps plus the final one."""
    t = cfg.train
    gbs = global_batch_size(t.micro_batch_size, dp_size, grad_accum_for(t, dp_size))
    evaluations = (t.steps // t.eval_every if t.eval_every else 0) + 1
    return t.steps * gbs, evaluations * t.eval_batches * t.micro_batch_size * dp_size
