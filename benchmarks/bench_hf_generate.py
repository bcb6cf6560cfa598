#!/usr/bin/env python
"""Exported Hugging Face model: batched generate() against the same rows one by one.

    python benchmarks/bench_hf_generate.py [--family adaponderlm] [--batch 4] [--new 16]
                                           [--prompts 8-32]

Builds the tiny family (d=128, 2 layers, vocabulary 8192; untrained gates perturbed and
``ponder.tau`` raised so that tokens halt at different iterations), exports it with
tools/convert_checkpoint.py, loads it with ``AutoModelForCausalLM(trust_remote_code=True)`` and
reports CPU time of one left-padded batched ``generate()`` / the sum of the rows generated
alone (median of ``--repeats``), and that the tokens agree. The prompts are random ids, their
lengths drawn in ``--prompts`` LO-HI (``1-1``: every prompt one token). Baselines in the same run: the rows
one by one, and the batch through the per-row path (one decoder per row, rows in lockstep: what
``generate()`` runs when ``stopping_criteria`` is given; here one that never stops).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="adaponderlm")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", default="8-32", help="prompt lengths LO-HI (tokens)")
    args = ap.parse_args()
    args.shortest, args.longest = (int(n) for n in args.prompts.split("-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-hf-generate-") as tmp:
        # this run's own cache of the exported code (transformers_modules.<folder>): a shared
        # one would let another process's export replace the code this run loads
        os.environ["HF_MODULES_CACHE"] = os.path.join(tmp, "modules")
        return _build_and_measure(args, tmp)


def _build_and_measure(args, tmp) -> int:
    import torch

    from benchmarks._configs import sized_config
    from megaponder.models import build_model

    torch.set_num_threads(args.threads)
    cfg = sized_config(args.family, 128, 2, 8192, 256,
                       ["ponder.tau=0.5"] if args.family == "adaponderlm" else [])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in model.extra_parameter_names():
                p.add_(0.3 * torch.randn_like(p))
    return _measure(args, cfg, model, tmp)


def _measure(args, cfg, model, tmp) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from megaponder.convert.checkpoint import megaponder_to_hf_checkpoint
    from megaponder.train.checkpoint import write_model_files

    write_model_files(os.path.join(tmp, "ck"), cfg, model.state_dict(), {"step": 0})
    megaponder_to_hf_checkpoint(os.path.join(tmp, "ck"), os.path.join(tmp, "hf"))
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), trust_remote_code=True)
    loaded_from = sys.modules[type(hf).__module__].__file__
    if not loaded_from.startswith(tmp):
        print(f"the exported model's code was loaded from {loaded_from}, not from this run's export")
        return 2
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.model.vocab_size, (int(n),), generator=g)
               for n in torch.randint(args.shortest, args.longest + 1, (args.batch,), generator=g)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros(args.batch, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    kw = dict(max_new_tokens=args.new, eos_token_id=-1)  # no eos: every row runs to the end

    def never_stop(input_ids, scores):   # a stopping criterion: generate() decodes row by row
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    batched_t, rows_t, per_row_t = [], [], []
    for _ in range(args.repeats):
        t0 = time.process_time()
        out = hf.generate(ids, attention_mask=mask, **kw)
        batched_t.append(time.process_time() - t0)
        t0 = time.process_time()
        singles = [hf.generate(p.unsqueeze(0), **kw)[0, len(p):].tolist() for p in prompts]
        rows_t.append(time.process_time() - t0)
        t0 = time.process_time()
        per_row = hf.generate(ids, attention_mask=mask, stopping_criteria=[never_stop], **kw)
        per_row_t.append(time.process_time() - t0)
    same = [row[width:].tolist() for row in out] == singles and torch.equal(out, per_row)
    batched = statistics.median(batched_t)
    print(f"{args.family}: B={args.batch}, prompts {args.prompts}, {args.new} new tokens, {args.threads} thread(s): "
          f"batched / rows one by one CPU time = {batched / statistics.median(rows_t):.2f}; "
          f"batched / batch through the per-row path = {batched / statistics.median(per_row_t):.2f}; "
          f"tokens equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
