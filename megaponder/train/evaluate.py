"""Validation perplexity (plus depth statistics of adaptive families), shared by the
trainer's periodic validation and ``megaponder eval``."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


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
    totals = torch.zeros(4, dtype=torch.float64)  # loss*n, iters*n, flops*n, n
    iterator = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc="eval", unit="batch", leave=False)
    device = next(model.parameters()).device
    for batch in iterator:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        out = model(**inputs)
        n = float((inputs["targets"] != -100).sum())
        totals += torch.tensor([_scalar(out.lm_loss) * n,
                                _scalar(out.stats.get("mean_iters", 1.0)) * n,
                                _scalar(out.stats.get("flops_ratio", 1.0)) * n, n],
                               dtype=torch.float64)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        from ..parallel.state import collective_device
        reduced = totals.to(collective_device())
        torch.distributed.all_reduce(reduced, group=group)  # DP ranks hold different batches
        totals = reduced.cpu()
    model.train(was_training)
    n = max(totals[3].item(), 1.0)
    loss = totals[0].item() / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "mean_iters": totals[1].item() / n,
            "flops_ratio": totals[2].item() / n, "tokens": int(totals[3].item())}


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
