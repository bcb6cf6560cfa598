"""Shared by the benchmark scripts: the tiny per-family configs (examples/configs), optionally
resized to a benchmark's shape."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_report(path: str, text: str, data, json_path=None) -> None:
    """A study's results: the markdown ``text`` at ``path`` and ``data`` as JSON beside it
    (the same name with .json, or ``json_path``)."""
    import json
    with open(path, "w") as f:
        f.write(text)
    with open(json_path or os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(data, f, indent=1)


def tiny_config_path(family: str) -> str:
    """examples/configs/tiny.yml for vanilla, tiny-<family>.yml otherwise."""
    return os.path.join(ROOT, "examples", "configs", "tiny.yml" if family == "vanilla" else f"tiny-{family}.yml")


def sized_config(family: str, hidden: int, layers: int, vocab: int, seq: int, extra=()):
    """The tiny config of ``family`` at width ``hidden`` (64-dim heads), ``layers`` layers,
    vocabulary ``vocab`` and sequence length ``seq``, sdpa attention, plus ``extra``
    ``section.key=value`` overrides."""
    from megaponder.config import load_config
    return load_config(tiny_config_path(family), [
        f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.num_heads={hidden // 64}",
        f"model.vocab_size={vocab}", f"model.max_position_embeddings={seq}", f"data.seq_length={seq}",
        "model.attention_backend=sdpa", *extra], check_paths=False)


def calibrate_tau(model, ids, halted_fraction, iters=24):
    """tau such that ``halted_fraction`` of the pondering slots (passes 1..K) are skipped in
    the dense forward (mean_iters = 1 + K (1 - h)); the gates are untrained, so tau is what
    sets how many tokens halt."""
    import torch

    k = model.num_passes - 1
    target = 1 + k * (1 - halted_fraction)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        model.ponder_cfg.tau = (lo + hi) / 2
        with torch.no_grad():
            mean_iters = float(model(ids).stats["mean_iters"])
        if mean_iters > target:
            lo = model.ponder_cfg.tau
        else:
            hi = model.ponder_cfg.tau
    return model.ponder_cfg.tau, mean_iters


def time_token_by_token(make_decoder, ids, prompt: int, clock=None):
    """(seconds of the token-by-token part, logits [B, T, V] of every position) of a fresh
    decoder from ``make_decoder()``: ``ids[:, :prompt]`` fed at once, then one token a step.
    ``clock``: time.perf_counter (default, wall time) or time.process_time (this process's CPU
    time: on a shared CPU it leaves out the time other processes held the cores)."""
    import time
    clock = clock or time.perf_counter

    import torch

    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()

    dec = make_decoder()
    with torch.no_grad():
        out = [dec.feed(ids[:, :prompt])]
        sync()
        start = clock()
        for j in range(prompt, ids.shape[1]):
            out.append(dec.feed(ids[:, j:j + 1]))
        sync()
    return clock() - start, torch.cat(out, 1)


def time_staggered(model, ids, prompt: int, clock=None, gates_in_range=None):
    """Seconds of the decode part of megaponder/models/staggered.py on ``ids`` [B, T]:
    ``ids[:, :prompt]`` prefilled, then the remaining tokens of every row fed (teacher forced),
    each row at its own pass: the same tokens ``time_token_by_token`` feeds one at a time.
    ``gates_in_range``: the decoder's gate policy (None: its default for the device)."""
    import time
    clock = clock or time.perf_counter

    import torch

    from megaponder.models.staggered import StaggeredDecoder

    steps = ids.shape[1] - prompt
    dec = StaggeredDecoder(model)
    dec.gates_in_range = gates_in_range
    dec.prefill(ids[:, :prompt], steps)
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = clock()
    dec.decode(ids[:, prompt], steps,
               lambda logits, done, rows: ids[rows, (prompt + done + 1).clamp_max(ids.shape[1] - 1)])
    if ids.is_cuda:
        torch.cuda.synchronize()
    return clock() - start
