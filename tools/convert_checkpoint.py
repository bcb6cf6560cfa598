#!/usr/bin/env python
"""Convert checkpoints between Hugging Face Pythia and megaponder.

  python tools/convert_checkpoint.py --from hf --to megaponder --input HF_DIR --output DIR \\
      [--family adaponderlm] [--tp N] [--pp N] [--vocab-size 50277]
  python tools/convert_checkpoint.py --from megaponder --to hf --input RUN_OR_CKPT --output HF_DIR

HF_DIR is a ``save_pretrained`` folder of ``GPTNeoXForCausalLM`` (e.g. a downloaded
EleutherAI/pythia-410m). ``--family`` starts any pondering family from the Pythia weights
(gates/routers initialised from the config defaults) for continued pretraining.

``--to hf`` writes vanilla as GPTNeoXForCausalLM and every other family as a self-contained
``trust_remote_code`` model (docs/sharing.md); ``--from hf`` of such an export restores the
megaponder checkpoint exactly.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from megaponder.config import FAMILIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", choices=["hf", "megaponder"], required=True)
    p.add_argument("--to", dest="dst", choices=["hf", "megaponder"], required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--family", default="vanilla", choices=FAMILIES)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree the run will use")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree the run will use")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real tokenizer vocabulary (Pythia: 50277); default: the HF embedding rows")
    args = p.parse_args(argv)
    if args.src == args.dst:
        p.error("--from and --to must differ")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megaponder.convert.checkpoint import hf_to_megaponder_checkpoint, megaponder_to_hf_checkpoint

    if args.src != "hf" and (args.family != "vanilla" or args.tp != 1 or args.pp != 1):
        p.error("--family/--tp/--pp apply to --from hf only")
    try:
        if args.src == "hf":
            cfg = hf_to_megaponder_checkpoint(args.input, args.output, args.family, args.tp, args.pp,
                                              args.vocab_size)
            print(f"wrote megaponder {cfg.model.family} checkpoint to {args.output} "
                  f"({cfg.model.num_layers} layers, d={cfg.model.hidden_size}); train from it with "
                  f"--set train.init_checkpoint={args.output}")
        else:
            written = megaponder_to_hf_checkpoint(args.input, args.output)
            remote = "" if written == "GPTNeoXForCausalLM" else " (load with trust_remote_code=True)"
            print(f"wrote Hugging Face {written} to {args.output}{remote}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        # one line saying what is wrong; a missing or unreadable input fails before --output is made
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"convert_checkpoint: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
