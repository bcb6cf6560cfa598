"""lm-evaluation-harness on megaponder checkpoints, without conversion.

:class:`MegaponderLM` is an lm-eval model (registered as ``megaponder``) around
``megaponder.load_model(checkpoint)``: any family, any tensor/pipeline layout the checkpoint
was saved with. Beside lm-eval's answers it counts what the model *executed* on the tokens it
scored:

* ``mean_iters`` — backbone iterations per scored token (``token_iterations`` of the family's
  forward with ``return_token_stats=True``: the halting/pruning the KV-cached decoder applies);
* ``flops_ratio`` — inference FLOPs of those tokens against a vanilla model of the same shape
  (megaponder/models/flops.py's KV-cached convention). A scored token's FLOPs are its marginal
  cost in cached decoding: FLOPs(whole sequence) - FLOPs(prefix before it), so the context the
  harness prepends is not charged, but the keys it leaves in the cache are.

"Scored tokens" are the positions whose next-token prediction enters a loglikelihood (the
continuation of ``loglikelihood`` / ``multiple_choice`` requests and every token of
``loglikelihood_rolling``). ``generate_until`` decodes with megaponder's cached decoder
(megaponder.infer.generate, greedy unless the task asks for sampling) and adds nothing to the
two numbers.

Scoring uses the family's full forward, batched with right padding: every family is causal, so
padding after a row changes none of its logits or halting decisions (tests check batched ==
one by one). Log-probabilities are over the model's whole (padded) vocabulary, as the
Hugging Face route sees it, so both routes give the same numbers on a vanilla model.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Optional

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..models.flops import Dims, inference_flops


def _vertical_activity(iterations: torch.Tensor, passes: int) -> torch.Tensor:
    """[passes, T] bool: a token that ran n iterations was active in iterations 0..n-1
    (halting is monotone in every vertical family)."""
    return torch.arange(passes).unsqueeze(1) < iterations.round().long().unsqueeze(0)


class ComputeCounter:
    """Sums of iterations and of family / vanilla inference FLOPs over scored tokens."""

    def __init__(self, model):
        self.dims = Dims.of(model)
        self.vanilla = Dims(**{**self.dims.__dict__, "family": "vanilla"})
        self.tokens = 0
        self.iterations = 0.0
        self.flops = 0.0
        self.vanilla_flops = 0.0

    def _activity(self, iterations: torch.Tensor):
        if self.dims.kind == "latent":
            return iterations.double()  # ponderlm3: executed steps per token; others ignore it
        return _vertical_activity(iterations, self.dims.passes).double()

    def _marginal(self, dims: Dims, length: int, start: int, activity) -> float:
        """FLOPs of decoding positions start..length-1 after a cached prefix of ``start``."""
        total = inference_flops(dims, length, activity[..., :length])
        return total - (inference_flops(dims, start, activity[..., :start]) if start > 0 else 0.0)

    def add(self, iterations: torch.Tensor, start: int) -> None:
        """``iterations`` [T] of one unpadded row; positions ``start..T-1`` were scored."""
        iterations = iterations.detach().double().cpu()
        length = iterations.numel()
        a = self._activity(iterations)
        self.tokens += length - start
        self.iterations += float(iterations[start:].sum())
        self.flops += self._marginal(self.dims, length, start, a)
        self.vanilla_flops += self._marginal(self.vanilla, length, start, a)

    def summary(self) -> dict:
        if self.tokens == 0:
            return {"mean_iters": None, "flops_ratio": None, "scored_tokens": 0}
        return {"mean_iters": self.iterations / self.tokens,
                "flops_ratio": self.flops / self.vanilla_flops, "scored_tokens": self.tokens}


def _checkpoint_tokenizer(folder: str, override: Optional[str] = None):
    from ..data import build_tokenizer
    from ..train.checkpoint import checkpoint_tokenizer_path

    path = checkpoint_tokenizer_path(folder, override)
    if path is None:
        raise FileNotFoundError(f"no tokenizer found for checkpoint {folder}; pass tokenizer_model=PATH")
    return build_tokenizer(None, path)


# lm_eval.models is imported above on purpose: lm-eval 0.4.13 fills its model registry with the
# built-in models (hf, vllm, ...) only while the registry is empty, so registering ours first
# would hide `hf` from every later simple_evaluate(model="hf") in the same process.
@register_model("megaponder")
class MegaponderLM(TemplateLM):
    """``lm_eval`` model over a megaponder checkpoint (run dir or checkpoint folder).

    Python: ``simple_evaluate(model=MegaponderLM("runs/x"), tasks=[...])``. Model args (the
    ``--model_args`` string form): ``checkpoint`` (``pretrained`` is an alias), ``batch_size``,
    ``device`` (auto = cuda when available), ``max_length`` (default: the model's
    ``max_position_embeddings``), ``tokenizer_model``, ``seed`` (sampled generation)."""

    backend = "causal"

    def __init__(self, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
                 batch_size: int | str = 1, device: Optional[str] = None,
                 max_length: Optional[int] = None, tokenizer_model: Optional[str] = None,
                 seed: int = 0, **kwargs):
        super().__init__()
        from ..train.checkpoint import load_model, resolve_checkpoint

        path = checkpoint or pretrained
        if path is None:
            raise ValueError("the megaponder lm-eval model needs checkpoint=DIR")
        self.folder = resolve_checkpoint(path)
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(self.folder).to(torch.device(device)).eval()
        self._device = next(self.model.parameters()).device
        self.tok = _checkpoint_tokenizer(self.folder, tokenizer_model)
        self.max_length = int(max_length or self.model.cfg.max_position_embeddings)
        from .batch_size import pick_batch_size
        self.batch_size = pick_batch_size(batch_size, self.model, self.max_length, self._device)
        self.seed = int(seed)
        self.counter = ComputeCounter(self.model)

    # -- tokenizer ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # megaponder tokenizers add no BOS/EOS

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # -- scoring --------------------------------------------------------------------------
    def _rows(self, requests):
        """(input ids, number of scored positions at its end, continuation) per request,
        left-truncated to ``max_length`` inputs like lm-eval's Hugging Face model."""
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs = whole[:-1]
            yield inputs, min(len(continuation), len(inputs)), whole[len(whole) - len(continuation):]

    #: forwards run so far: the evaluation stream of the next one (set_eval_stream)
    _forwards = 0

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int, list[int]]]) -> list[tuple[float, bool]]:
        """One padded forward over ``rows``; counts their scored tokens."""
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.tok.eod, dtype=torch.long)
        for i, (inputs, _, _) in enumerate(rows):
            ids[i, :len(inputs)] = torch.tensor(inputs)
        if hasattr(self.model, "set_eval_stream"):
            # the random-pruning baselines draw one pattern per forward, as megaponder eval
            # does per batch: a fixed pattern for every batch would score one draw only
            self.model.set_eval_stream(self._forwards)
        self._forwards += 1
        out = self.model(ids.to(self.device), return_token_stats=True)
        logprobs = F.log_softmax(out.logits.float(), dim=-1)
        iterations = out.stats["token_iterations"]
        results = []
        for i, (inputs, n, cont) in enumerate(rows):
            t = len(inputs)
            lp = logprobs[i, t - n:t]
            target = torch.tensor(cont[-n:], device=lp.device)
            results.append((float(lp.gather(-1, target.unsqueeze(-1)).sum()),
                            bool((lp.argmax(-1) == target).all())))
            self.counter.add(iterations[i, :t], t - n)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from tqdm import tqdm

        rows = list(self._rows(requests))
        # longest first, so one batch holds similar lengths (less padding); answers go back
        # to the request order
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="megaponder loglikelihood", disable=disable_tqdm)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            for i, res in zip(chunk, self._score([rows[i] for i in chunk])):
                results[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..infer import generate

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", True) else 0.0
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            new = generate(self.model, prompt, max_new, temperature, int(kw.pop("top_k", 0) or 0),
                           vocab_size=self.tok.vocab_size, eos_id=self.eot_token_id, seed=self.seed)
            text = self.tok_decode(new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def compute_summary(self) -> dict:
        return {"family": self.model.family, **self.counter.summary()}


# -- the `megaponder lm-eval` command -------------------------------------------------------
def _task_manager(tasks: list[str], include_paths: list[str]):
    """A TaskManager that knows every requested task, or SystemExit with one line naming the
    unknown ones. Indexing lm-eval's ~15k built-in tasks costs seconds, so it is skipped when
    the include paths hold them all (the offline tasks, a user's own YAMLs)."""
    from lm_eval.tasks import TaskManager

    def missing(tm):
        known = set(tm.all_tasks)
        return [t for t in tasks if t not in known]

    if include_paths:
        tm = TaskManager(include_path=include_paths, include_defaults=False)
        if not missing(tm):
            return tm
    tm = TaskManager(include_path=include_paths or None)
    unknown = missing(tm)
    if unknown:
        from .tasks import OFFLINE_TASKS
        raise SystemExit(f"megaponder lm-eval: unknown task(s) {', '.join(unknown)}: not an lm-eval task, "
                         f"group or tag, nor in --include_path; offline tasks: {', '.join(OFFLINE_TASKS)} "
                         f"(list all with `lm_eval ls tasks`)")
    return tm


def _limit(value: Optional[str]):
    if value is None:
        return None
    number = float(value)
    return int(number) if number >= 1 else number  # lm-eval: < 1 is a fraction of each task


def run_lm_eval(args) -> int:
    """``megaponder lm-eval``: lm-eval's table, then one JSON object (last line) with every
    task's metrics, ``mean_iters`` and ``flops_ratio``."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from .tasks import OFFLINE_TASKS, offline_task_dir

    from ..train.checkpoint import resolve_checkpoint

    try:  # before the task index is built: a wrong path should fail in a second
        checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        raise SystemExit(f"megaponder lm-eval: {err}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SystemExit("megaponder lm-eval: --tasks is empty; name at least one task")
    # include paths: only the folders the user named, plus (for an offline task) a private
    # temp folder this run writes the offline tasks into and removes at the end
    include = [p for p in (args.include_path or "").split(",") if p]
    with contextlib.ExitStack() as stack:
        if any(t in OFFLINE_TASKS for t in tasks):
            include.append(stack.enter_context(
                offline_task_dir(args.demo_dir, log=lambda *a: print(*a, file=sys.stderr))))
        task_manager = _task_manager(tasks, include)
        if args.threads:
            torch.set_num_threads(args.threads)
        lm = MegaponderLM(checkpoint, batch_size=args.batch_size, device=args.device,
                          max_length=args.max_length, tokenizer_model=args.tokenizer_model, seed=args.seed)
        tracker = None
        if args.output_path:
            from lm_eval.loggers import EvaluationTracker
            tracker = EvaluationTracker(output_path=args.output_path)
        results = simple_evaluate(
            # model_args is ignored for an LM object, but names the --output_path subfolder
            model=lm, model_args=f"pretrained={checkpoint}", tasks=tasks, num_fewshot=args.num_fewshot,
            limit=_limit(args.limit), task_manager=task_manager, log_samples=args.log_samples,
            evaluation_tracker=tracker, gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed)
    summary = lm.compute_summary()
    results["megaponder"] = summary
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if args.log_samples:
            for name in results["configs"]:
                tracker.save_results_samples(task_name=name, samples=samples[name])
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    line = {"checkpoint": lm.folder, **summary,
            "tasks": {name: {k: v for k, v in metrics.items() if k != "alias"}
                      for name, metrics in results["results"].items()}}
    print(json.dumps(line, default=handle_non_serializable))
    return 0
