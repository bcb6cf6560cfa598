"""How many samples a run asks for — one definition shared by the trainer and the data tools.

The sample order depends on ``num_train_samples`` (the epoch count and the shuffle are derived
from it), so ``tools/inspect_dataset.py`` and ``tools/build_index_cache.py`` must compute it
exactly as the trainer does. Both call :func:`run_num_samples`.
"""
from __future__ import annotations


def global_batch_size(micro_batch_size: int, dp_size: int, grad_accum_steps: int) -> int:
    return micro_batch_size * dp_size * grad_accum_steps


def run_num_samples(cfg, dp_size: int) -> tuple[int, int]:
    """(num_train_samples, num_valid_samples) for a resolved ``Config`` on ``dp_size`` ranks.

    train: ``train.steps × global batch``. valid: ``eval_batches × micro_batch × dp`` per
    evaluation, one evaluation every ``eval_every`` steps plus the final one."""
    t = cfg.train
    gbs = global_batch_size(t.micro_batch_size, dp_size, t.grad_accum_steps)
    evaluations = (t.steps // t.eval_every if t.eval_every else 0) + 1
    return t.steps * gbs, evaluations * t.eval_batches * t.micro_batch_size * dp_size
