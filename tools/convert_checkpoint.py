#!/usr/bin/env python
"""Convert checkpoints between Hugging Face Pythia / Llama and megaponder, and GPT-NeoX native
ones in.

  python tools/convert_checkpoint.py --from hf --to megaponder --input HF_DIR --output DIR \\
      [--family adaponderlm] [--tp N] [--pp N] [--vocab-size 50277]
  python tools/convert_checkpoint.py --from megaponder --to hf --input RUN_OR_CKPT --output HF_DIR
  python tools/convert_checkpoint.py --from neox --to megaponder --input NEOX_DIR/global_stepN \
      --config NEOX.yml --output DIR [--family F] [--tp N] [--pp N] [--vocab-size 50277]

HF_DIR is a ``save_pretrained`` folder of ``GPTNeoXForCausalLM`` (e.g. a downloaded
EleutherAI/pythia-410m) or ``LlamaForCausalLM`` (detected from its config.json's model_type;
converted to ``model.backbone: llama``). ``--family`` starts any pondering family from the weights
(gates/routers initialised from the config defaults) for continued pretraining.
``--from neox`` reads a GPT-NeoX training checkpoint (layer_XX-model_YY-model_states.pt of a
pipeline model, or mp_rank_YY_model_states.pt) at any model-parallel size, with the run's YAML.

``--to hf`` writes vanilla as GPTNeoXForCausalLM (llama backbone: LlamaForCausalLM) and every other family as a self-contained
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
    p.add_argument("--from", dest="src", choices=["hf", "megaponder", "neox"], required=True)
    p.add_argument("--to", dest="dst", choices=["hf", "megaponder"], required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--family", default="vanilla", choices=FAMILIES)
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree the run will use (default 1; re-importing a "
                        "megaponder export: the exported run's)")
    p.add_argument("--pp", type=int, default=None,
                   help="pipeline-parallel degree the run will use (default as --tp)")
    p.add_argument("--config", nargs="+", default=None,
                   help="--from neox: the GPT-NeoX run's config YAML(s), merged in order")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real tokenizer vocabulary (Pythia: 50277); default: the HF embedding rows")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr: GPT-NeoX shard files read, Hugging Face "
                        "weights loaded and shards written (default: when stderr is a terminal)")
    args = p.parse_args(argv)
    if args.src == args.dst:
        p.error("--from and --to must differ")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    from transformers.utils import logging as hf_logging
    # transformers draws its own bars (per tensor loaded, per shard written): the same switch,
    # put back afterwards (main also runs inside other programs and tests)
    was_on = hf_logging.is_progress_bar_enabled()
    _transformers_bars(progress)
    try:
        return _convert(p, args, progress)
    finally:
        _transformers_bars(was_on)


def _transformers_bars(on: bool) -> None:
    from transformers.utils import logging as hf_logging

    if on:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def _convert(p: argparse.ArgumentParser, args, progress: bool) -> int:
    from megaponder.convert.checkpoint import hf_to_megaponder_checkpoint, megaponder_to_hf_checkpoint

    if args.src == "megaponder" and (args.family != "vanilla" or args.tp is not None or args.pp is not None):
        p.error("--family/--tp/--pp apply to --from hf and --from neox only")
    try:
        if args.src == "neox":
            if args.dst != "megaponder":
                p.error("--from neox converts to megaponder only (then --from megaponder --to hf)")
            if not args.config:
                p.error("--from neox needs --config NEOX.yml (the run's GPT-NeoX config)")
            from megaponder.convert.neox_native import neox_to_megaponder_checkpoint
            cfg = neox_to_megaponder_checkpoint(args.input, args.config, args.output, args.family,
                                                args.tp or 1, args.pp or 1, args.vocab_size,
                                                progress=progress)
            print(f"wrote megaponder {cfg.model.family} checkpoint to {args.output} from GPT-NeoX "
                  f"{args.input} ({cfg.model.num_layers} layers, d={cfg.model.hidden_size})")
        elif args.src == "hf":
            cfg = hf_to_megaponder_checkpoint(args.input, args.output, args.family, args.tp, args.pp,
                                              args.vocab_size)
            print(f"wrote megaponder {cfg.model.family} checkpoint to {args.output} "
                  f"({cfg.model.num_layers} layers, d={cfg.model.hidden_size}); train from it with "
                  f"--set train.init_checkpoint={args.output}")
        else:
            written = megaponder_to_hf_checkpoint(args.input, args.output)
            remote = "" if written in ("GPTNeoXForCausalLM", "LlamaForCausalLM") else " (load with trust_remote_code=True)"
            print(f"wrote Hugging Face {written} to {args.output}{remote}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        # one line saying what is wrong (NeoXCheckpointError and checkpoint errors included);
        # a missing or unreadable input fails before --output is made
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"convert_checkpoint: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
