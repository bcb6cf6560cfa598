"""Validation perplexity (plus depth statistics of adaptive families), shared by the
trainer's periodic validation and ``megaponder eval``."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from ..models.spec import family_spec


def model_inputs(batch: dict) -> dict:
    """Split a batch of ``seq_len + 1`` tokens into model inputs and aligned targets."""
    tokens = batch["tokens"]
    inputs = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"][:, :-1]
    if "segment_ids" in batch:
        inputs["segment_ids"] = batch["segment_ids"][:, :-1]
    return inputs


def _scalar(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], group=None,
             progress: bool = False) -> dict:
    """Token-weighted mean loss over ``batches``, summed over the data-parallel ``group``
    (tensor/pipeline ranks of one replica see the same batches and the same loss)."""
    was_training = model.training
    model.eval()
    # loss*n, iters*n, flops*n, n, Jacobi passes (sum over batches), batches, max residual
    totals = torch.zeros(6, dtype=torch.float64)
    residual = torch.zeros(1, dtype=torch.float64)
    iterator = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc="eval", unit="batch", leave=False)
    device = next(model.parameters()).device
    rank, world = 0, 1
    if group is not None and torch.distributed.get_world_size(group) > 1:
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    for i, batch in enumerate(iterator):
        if hasattr(model, "set_eval_stream"):  # per-batch random draws (pruning baselines)
            model.set_eval_stream(i * world + rank)
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        out = model(**inputs)
        n = float((inputs["targets"] != -100).sum())
        totals += torch.tensor([_scalar(out.lm_loss) * n,
                                _scalar(out.stats.get("mean_iters", 1.0)) * n,
                                _scalar(out.stats.get("flops_ratio", 1.0)) * n, n,
                                _scalar(out.stats.get("jacobi_passes", 0.0)), 1.0],
                               dtype=torch.float64)
        residual = torch.maximum(residual, torch.tensor([_scalar(out.stats.get("jacobi_residual", 0.0))],
                                                        dtype=torch.float64))
    if world > 1:
        from ..collectives import collective_device
        reduced = totals.to(collective_device())
        torch.distributed.all_reduce(reduced, group=group)  # DP ranks hold different batches
        totals = reduced.cpu()
        reduced = residual.to(collective_device())
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=group)
        residual = reduced.cpu()
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    loss = totals[0].item() / n
    result = {"ppl": math.exp(min(loss, 50.0)), "loss": loss, "mean_iters": totals[1].item() / n,
              "flops_ratio": totals[2].item() / n, "tokens": int(totals[3].item())}
    result.update(computation(model, totals[4].item() / max(totals[5].item(), 1.0), residual.item()))
    return result


def computation(model: torch.nn.Module, jacobi_passes: float = 0.0, residual: float = 0.0) -> dict:
    """What an evaluation of this model computed, for its JSON: PonderLM-2/3 add ``eval_mode``
    (exact: Jacobi to ``jacobi_tol``; official: a fixed count), the mean Jacobi passes per
    batch and the largest last-pass change of a thought (``jacobi_residual``); PonderLM-3
    adds ``hard_prune`` (perplexity from the pruned computation its flops_ratio counts)."""
    spec = family_spec(getattr(model, "family", "vanilla"))
    if not spec.jacobi:
        return {}
    p = model.ponder_cfg
    info = {"eval_mode": p.eval_mode, "jacobi_passes": jacobi_passes}
    if p.eval_mode == "exact":
        info.update({"jacobi_tol": p.eval_jacobi_tol, "jacobi_residual": residual})
    if spec.halting == "router":
        info["hard_prune"] = bool(p.eval_hard_prune)
    return info


def sequential_batches(dataset, seq_length: int, batch_size: int,
                       max_samples: Optional[int] = None) -> Iterable[dict]:
    """Non-overlapping windows of ``seq_length + 1`` tokens over the concatenation of all
    sequences of an indexed dataset, in file order: every token is predicted once (the
    first one excepted), so the result is the dataset's perplexity, not a sample of it.
    Reads the files lazily, so a few windows of a huge validation set cost a few windows."""
    import numpy as np

    def windows():
        buffer = np.empty(0, dtype=np.int64)
        for i in range(len(dataset)):
            buffer = np.concatenate([buffer, np.asarray(dataset[i], dtype=np.int64)])
            while len(buffer) >= seq_length + 1:
                yield buffer[: seq_length + 1]
                buffer = buffer[seq_length:]  # the last token is the next window's first input

    rows, produced = [], 0
    for row in windows():
        if max_samples is not None and produced >= max_samples:
            break
        rows.append(row)
        produced += 1
        if len(rows) == batch_size:
            yield {"tokens": torch.from_numpy(np.stack(rows))}
            rows = []
    if rows:
        yield {"tokens": torch.from_numpy(np.stack(rows))}
    if produced == 0:
        raise ValueError(f"the dataset holds fewer than {seq_length + 1} tokens, not one window; "
                         f"pass a smaller --seq-length")
