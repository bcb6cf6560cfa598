"""The ``megaponder`` command (also ``python -m megaponder``).

    megaponder train    --config FILE.yml [--set key.sub=value]...
    megaponder generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
    megaponder eval     --checkpoint DIR --data PREFIX
    megaponder lm-eval  --checkpoint DIR --tasks T1,T2 [--limit N] ...
    megaponder fprinciple {1d,digits,lm} ...   (docs/analysis.md)
    megaponder plan     --config FILE.yml --world-size N --device H100|--memory-gb G
    megaponder compare  RUN_DIR... [--plot FILE.png] [--data PREFIX]
"""
from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set or [])
    from .analysis.fprinciple_monitor import step_hook as fprinciple_hook
    from .train import train

    try:
        train(cfg, step_hooks=[fprinciple_hook])
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """The command's last step: tear down the process group while the interpreter still runs.
    Left to interpreter shutdown, gloo's and the TCPStore's C++ threads can be destroyed while
    joinable, and a rank that finished cleanly (a SIGTERM during start-up included) aborts
    with "terminate called without an active exception" (rc 134) instead of exiting 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _load_tokenizer(folder: str, override: str | None):
    from .data import build_tokenizer
    from .train.checkpoint import checkpoint_tokenizer_path, read_checkpoint_config

    path = checkpoint_tokenizer_path(folder, override)
    if path is None:
        raise SystemExit(f"no tokenizer found for checkpoint {folder}; pass --tokenizer-model")
    # the run's data.eod_token, so generation stops where its documents ended
    return build_tokenizer(None, path, read_checkpoint_config(folder).data.eod_token)


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _generate(args) -> int:
    from .infer import generate, generate_batch
    from .train.checkpoint import load_model, resolve_checkpoint

    if len(args.prompt) > 1 and (args.static_cache or args.compile):
        from .errors import UserError
        raise UserError("--static-cache/--compile decode one prompt: pass a single --prompt or "
                        "drop them")
    folder = resolve_checkpoint(args.checkpoint)
    model = load_model(folder).to(_device(args.device))
    tok = _load_tokenizer(folder, args.tokenizer_model)
    if len(args.prompt) > 1:   # one batch; a JSON line per prompt (a continuation may hold newlines)
        prompts = [tok.encode(text) for text in args.prompt]
        news = generate_batch(model, prompts, args.max_new_tokens, args.temperature, args.top_k,
                              vocab_size=tok.vocab_size, eos_id=tok.eod, seed=args.seed)
        for prompt, new in zip(prompts, news):
            print(json.dumps(prompt + new) if args.ids else json.dumps(tok.decode(prompt + new)))
        return 0
    prompt = tok.encode(args.prompt[0])
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                   vocab_size=tok.vocab_size, eos_id=tok.eod, seed=args.seed,
                   static_cache=args.static_cache, compile=args.compile)
    # decode prompt and continuation together: decoding the new ids alone drops the word
    # boundary SentencePiece keeps on the first new piece ("beginning" + "of" -> "beginningof")
    print(tok.decode(prompt + new) if not args.ids else json.dumps(prompt + new))
    return 0


def _eval(args) -> int:
    import torch

    from .data import IndexedDataset
    from .train.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint
    from .train.evaluate import evaluate, sequential_batches

    folder = resolve_checkpoint(args.checkpoint)
    model = load_model(folder).to(_device(args.device))
    cfg = read_checkpoint_config(folder)
    seq = args.seq_length or cfg.data.seq_length
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_mode is not None:
        model.ponder_cfg.eval_mode = args.eval_mode
    dataset = IndexedDataset(args.data)
    windows = max(0, (dataset.num_tokens - 1) // seq)
    if args.max_samples is not None:
        windows = min(windows, args.max_samples)
    batches = sequential_batches(dataset, seq, args.batch_size, args.max_samples)
    # one line up front: an adaptive model on a large file takes minutes on a CPU
    print(f"megaponder eval: {windows:,} windows of {seq} tokens from {args.data}, "
          f"{cfg.model.family} model on {next(model.parameters()).device}", file=sys.stderr)
    if _progress_wanted(args):
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-windows // args.batch_size), desc="eval", unit="batch",
                       file=sys.stderr, dynamic_ncols=True)
    result = evaluate(model, batches)
    # CONTRACT keys first, then what the latent families computed (eval_mode, Jacobi passes)
    print(json.dumps(result))
    return 0


def _progress_wanted(args) -> bool:
    """--progress / --no-progress; by default a bar only when stderr is a terminal (a batch
    log would fill with redraws)."""
    return sys.stderr.isatty() if getattr(args, "progress", None) is None else args.progress


def _plan(args) -> int:
    from .train.plan import plan_command

    return plan_command(args)


def _lm_eval(args) -> int:
    try:
        from .evaluation.harness import run_lm_eval
    except ImportError as err:  # lm_eval is an optional extra
        raise SystemExit(f"megaponder lm-eval needs lm-evaluation-harness ({err}); install it with "
                         f"pip install 'megaponder[eval]' (lm_eval==0.4.13 and accelerate)")
    return run_lm_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaponder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher appends --local_rank=N; the rank also reaches us via env
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors (also MEGAPONDER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain or continue pretraining a model")
    p.add_argument("--config", required=True, help="YAML config (see docs/config.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=20 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="sample a continuation from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint folder")
    p.add_argument("--prompt", required=True, action="append",
                   help="the prompt; repeat it to continue several prompts as one batch (vertical "
                        "families: every row at its own pondering pass, docs/families.md "
                        "'Staggered decoding'; then one JSON line per prompt, in order, and "
                        "sampled tokens are drawn on the model's device)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-model", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--ids", action="store_true", help="print token ids (JSON) instead of text")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--static-cache", action="store_true",
                   help="decode on a preallocated KV cache with a fixed-shape step (vertical "
                        "families; same tokens)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the static-cache step (CUDA graphs on CUDA; implies "
                        "--static-cache; the first token pays the compile)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="perplexity of a checkpoint on an indexed dataset")
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint folder")
    p.add_argument("--data", required=True, help="indexed-dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the training length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many windows")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-mode", choices=("exact", "official"), default=None,
                   help="PonderLM-2/3: exact (Jacobi to ponder.eval_jacobi_tol, the default) or "
                        "official (ponder.eval_jacobi_passes passes); recorded in the JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint (docs/evaluation.md)")
    from .evaluation.cli_args import add_lm_eval_arguments
    add_lm_eval_arguments(p)
    p.set_defaults(func=_lm_eval)
    # fprinciple_cli and compare import torch only inside their handlers: --help, and any
    # argument error, answer without torch (tests/test_cli_errors.py)
    from .analysis.fprinciple_cli import add_parser as add_fprinciple_parser
    add_fprinciple_parser(sub)  # megaponder fprinciple {1d,digits,lm}

    p = sub.add_parser("plan", help="memory and FLOPs per rank of a training config, before launching it")
    p.add_argument("--config", required=True, help="YAML config (see docs/config.md)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key")
    p.add_argument("--world-size", type=int, default=1, help="processes of the job (tp*pp*dp)")
    p.add_argument("--device", default=None,
                   help="H100, H100 PCIe, H200, A100, A100 40GB, L40S, MI300X, cuda[:N] or cpu")
    p.add_argument("--memory-gb", type=float, default=None, help="memory of one device in GB")
    p.set_defaults(func=_plan)  # docs/performance.md

    from .analysis.compare import add_parser as add_compare_parser
    add_compare_parser(sub)  # megaponder compare RUN_DIR...
    return parser


def main(argv=None) -> int:
    from . import early_stop
    # `train` takes a SIGTERM that arrives while torch imports (the parser's too) and the
    # trainer starts as a stop request; the other commands get it back after parsing
    early_stop.hold()
    try:
        args = build_parser().parse_args(argv)
    except BaseException:  # --help, a usage error
        early_stop.release(redeliver=True)
        raise
    if args.func is not _train:
        early_stop.release(redeliver=True)
    from .errors import run_reporting_user_errors
    from .collectives import CollectiveTimeout
    from .train.guards import TrainingDiverged

    def command() -> int:
        try:
            return args.func(args)
        except TrainingDiverged as err:  # too many skipped steps: not a crash, no traceback
            print(f"megaponder: {err}", file=sys.stderr)
            return 3
        except CollectiveTimeout as err:  # a stuck or dead peer: its log has the cause
            print(f"megaponder: {err}", file=sys.stderr)
            return 4
        except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and exits 0)
            print("megaponder: interrupted", file=sys.stderr)
            return 130

    # a UserError (config, data, checkpoint) -> one line on stderr, exit 2; see errors.py
    try:
        return run_reporting_user_errors(command, debug=args.debug)
    finally:
        early_stop.release()


if __name__ == "__main__":
    sys.exit(main())
