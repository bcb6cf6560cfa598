"""``megaponder train``: the DeepSpeed training loop.

One path for every scale: even a single CPU process runs through the DeepSpeed engine, so
ZeRO, gradient accumulation, clipping and bf16 behave the same on a laptop and on a cluster.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from .. import early_stop
from ..config import Config, ConfigError
from ..data.schedule import global_batch_size, grad_accum_for
from ..models import build_model
from ..safe_files import write_atomic
from . import checkpoint as ckpt
from ..collectives import any_rank, max_over_ranks
from .guards import StopRequest, TrainingDiverged, fault_step_sleep
from . import reshard
from .phases import PhaseSchedule
from .evaluate import evaluate, model_inputs, sequential_batches
from .metrics import MetricsWriter, format_summary
from .throughput import StepProfiler, ThroughputMeter
from .schedule import lr_multiplier


def _log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[megaponder] {msg}", flush=True)


#: A step hook: ``make(trainer)`` once the trainer has its run dir, rank and metrics writer
#: returns None (off) or ``hook(step, model, metrics)``, called before the first step of a
#: fresh run (step 0) and after every step. The CLI wires the F-Principle probe this way
#: (megaponder/analysis/fprinciple_monitor.py), so training imports no analysis code.
StepHookFactory = Callable[["Trainer"], Optional[Callable[[int, Any, Any], Any]]]


class Trainer:
    def __init__(self, cfg: Config, step_hooks: Sequence[StepHookFactory] = ()):
        """Start-up, in phases that end with the ranks agreeing on success (a failure on one
        rank stops all of them with its message: megaponder/collectives.py)."""
        from ..collectives import agree_on_failure
        from ..parallel import parallelize, seed_everything
        from .engine import build_engine
        from .preflight import topology_from_config

        self.cfg = cfg
        self.topo = topology_from_config(cfg)  # process groups; preflight(world_size), agreed
        self.rank = self.topo.rank
        self.dp_size, self.dp_rank = self.topo.dp, self.topo.dp_rank
        with agree_on_failure("config"):
            # train.global_batch_size fixes the batch; the accumulation follows the world size
            cfg.train.grad_accum_steps = grad_accum_for(cfg.train, self.dp_size)
            if cfg.train.threads > 0:
                torch.set_num_threads(cfg.train.threads)
            # a micro-batch that cannot fit is refused before anything is allocated
            from .plan import check_micro_batch_fits
            check_micro_batch_fits(cfg, self.topo.world_size, _training_device())
        # ids beyond the vocabulary, another tokenizer, empty files: one clear error before any
        # model is built; the tokens are scanned once per job (megaponder/data/checks.py)
        from ..data.checks import open_and_check_data
        self.datasets = open_and_check_data(cfg, log=lambda msg: _log0(self.rank, msg))
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.lock, self.resumes = self._claim_run_dir()

        # Every rank builds the same full model from the same seed; parallelize() then keeps
        # its shard. Only afterwards do the ranks get their own streams (per pipeline stage,
        # per tensor-parallel rank), so the initial weights never depend on the layout.
        with agree_on_failure("building the model"):
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg)
            if cfg.train.init_checkpoint:
                self._load_init_weights(model, cfg.train.init_checkpoint)
            if cfg.ponder.freeze_backbone:
                trainable = set(model.extra_parameter_names())
                if not trainable:
                    raise ConfigError(f"ponder.freeze_backbone=true but family "
                                      f"'{cfg.model.family}' has no gate/router parameters to "
                                      f"train.")
                for name, p in model.named_parameters():
                    p.requires_grad_(name in trainable)
        model = parallelize(model, cfg, self.topo)
        seed_everything(cfg.train.seed, self.topo)
        self.engine = build_engine(model, cfg, self.topo,
                                   lr_lambda=lambda step: lr_multiplier(step, cfg.train.steps, cfg.optim))
        self.model = self.engine.module
        self.phases = (PhaseSchedule(cfg, self.engine, self.global_batch * cfg.data.seq_length)
                       if cfg.train.phases else None)

        self.step, self.consumed_samples = 0, 0
        if self.resumes:
            self._resume()
        if self.rank == 0:
            write_atomic(os.path.join(self.run_dir, "config.yml"), cfg.to_yaml())  # never through a link
        t = cfg.train
        wandb = (dict(project=t.wandb_project, name=t.wandb_run_name, entity=t.wandb_entity,
                      config=cfg.to_dict()) if t.wandb_project else None)
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, t.tensorboard, self.step, wandb)
        self.step_hooks = [hook for hook in (make(self) for make in step_hooks) if hook is not None]
        self._build_data()

    # -- data -----------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return global_batch_size(t.micro_batch_size, self.dp_size, t.grad_accum_steps)

    def _build_data(self) -> None:
        from ..data import build_data_iterator, build_train_valid_datasets
        from ..data.schedule import run_num_samples

        t = self.cfg.train
        # The sample order depends on the number of samples asked for; run_num_samples is the
        # one definition shared with tools/inspect_dataset.py and build_index_cache.py.
        num_train, num_valid = run_num_samples(self.cfg, self.dp_size)
        # the index bar only on a terminal: an error while building stays one line in a log
        self.train_ds, self.valid_ds = build_train_valid_datasets(
            self.cfg.data, t.seed, num_train, num_valid, self.datasets,
            progress=self.rank == 0 and t.progress_bar and sys.stderr.isatty())
        self.train_iter = build_data_iterator(self.train_ds, t.micro_batch_size, self.dp_rank,
                                              self.dp_size, self.consumed_samples,
                                              num_workers=self.cfg.data.num_workers)

    def _valid_batches(self) -> list[dict]:
        """The same batches at every evaluation, so the curve compares like with like. With
        ``data.valid_path`` they are the first windows of the validation files in file order
        (what ``megaponder eval`` reads), independent of the seed, so runs with different
        seeds or families are scored on the same tokens; otherwise the held-out split."""
        from ..config import _data_prefixes
        from ..data import build_data_iterator

        t = self.cfg.train
        per_rank = t.eval_batches * t.micro_batch_size
        if self.cfg.data.valid_path:
            rows, wanted = [], per_rank * self.dp_size
            for prefix in _data_prefixes(self.cfg.data.valid_path):
                ds = self.datasets[str(prefix)]  # opened once at start-up
                for batch in sequential_batches(ds, self.cfg.data.seq_length,
                                                batch_size=1, max_samples=wanted - len(rows)):
                    rows.append(batch["tokens"])
                if len(rows) >= wanted:
                    break
            mine = rows[self.dp_rank::self.dp_size]
            batches = [{"tokens": torch.cat(mine[i:i + t.micro_batch_size])}
                       for i in range(0, len(mine), t.micro_batch_size)]
            return [self._with_document_fields(b) for b in batches]
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return []
        it = build_data_iterator(self.valid_ds, t.micro_batch_size, self.dp_rank, self.dp_size, 0)
        n = min(t.eval_batches, max(1, len(self.valid_ds) // (t.micro_batch_size * self.dp_size)))
        return [next(it) for _ in range(n)]

    def _with_document_fields(self, batch: dict) -> dict:
        """Document-aware packing for validation windows, as the training samples get it."""
        d = self.cfg.data
        if not (d.reset_position_ids or d.reset_attention_mask):
            return batch
        from ..data import packing
        from ..data.checks import data_tokenizer

        if getattr(self, "_eod", None) is None:  # reads a tokenizer file: once per run
            self._eod = data_tokenizer(d).eod
        eod = self._eod
        if d.reset_position_ids:
            batch["position_ids"] = packing.position_ids(batch["tokens"], eod)
        if d.reset_attention_mask:
            batch["segment_ids"] = packing.segment_ids(batch["tokens"], eod)
        return batch

    # -- checkpoints ----------------------------------------------------------------------
    def _claim_run_dir(self):
        """Rank 0 locks the run dir and decides fresh start / resume (runlock.py); every rank
        gets the same decision or the same one-line error."""
        from .runlock import claim_run_dir

        lock, outcome = None, None
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            try:
                lock, resumes, notes = claim_run_dir(self.run_dir, self.ckpt_root,
                                                     self.cfg.train.resume, self.cfg.train.overwrite)
                outcome = {"resumes": resumes, "notes": notes}
            except ConfigError as err:
                outcome = {"error": err}
            except OSError as err:  # unwritable or vanished run dir: same one line on every rank
                outcome = {"error": ConfigError(f"train.run_dir={self.run_dir}: {err}")}
        box = [outcome]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = box[0]
        if "error" in outcome:
            raise outcome["error"]
        for note in outcome["notes"]:
            _log0(self.rank, note)
        return lock, outcome["resumes"]

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _load_init_weights(self, model, path: str) -> None:
        folder = ckpt.resolve_checkpoint(path)
        src, dst = ckpt.read_checkpoint_config(folder).model, self.cfg.model
        shape_keys = ("hidden_size", "num_layers", "num_heads", "ffn_size", "rotary_pct",
                      "parallel_residual")
        diffs = [f"model.{k}: checkpoint {getattr(src, k)}, this run {getattr(dst, k)}"
                 for k in shape_keys if getattr(src, k) != getattr(dst, k)]
        if src.padded_vocab() != dst.padded_vocab():
            diffs.append(f"padded vocabulary: checkpoint {src.padded_vocab()}, this run "
                         f"{dst.padded_vocab()} (set model.padded_vocab_size)")
        if diffs:
            raise ConfigError(f"train.init_checkpoint {folder} has a different backbone shape:\n  - "
                              + "\n  - ".join(diffs)
                              + "\nSet the run's model section to the checkpoint's (its config.yml).")
        state = ckpt.safe_load(os.path.join(folder, ckpt.MODEL_FILE), what="train.init_checkpoint weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"train.init_checkpoint {folder}: unexpected tensors {unexpected[:5]}")
        fresh = set(model.extra_parameter_names())
        if set(missing) - fresh:
            raise RuntimeError(f"train.init_checkpoint {folder}: missing tensors "
                               f"{sorted(set(missing) - fresh)[:5]}")
        from ..models.ponder import preserve_loaded_function
        if preserve_loaded_function(model, src.family):  # AdaPonderLM from PonderLM
            _log0(self.rank, f"gates opened to s = 1 - {self.cfg.ponder.gate_preserve_tol:g} "
                             f"(ponder.gate_preserve_tol) to keep the loaded PonderLM's function")
        _log0(self.rank, f"initialised weights from {folder}"
              + (f" ({len(missing)} new {self.cfg.model.family} tensors)" if missing else ""))

    def save(self) -> None:
        """Collective. Every rank writes into a staging folder; rank 0 publishes it (never
        non-finite weights: ``latest`` stays on the last good checkpoint). A full disk is a
        one-line :class:`DiskFull` naming the checkpoint folder."""
        from ..errors import disk_full
        try:
            self._save()
        except (OSError, RuntimeError) as err:
            full = disk_full(err, self.ckpt_root, f"saving step {self.step}")
            if full is None:
                raise
            raise full from err

    def _save(self) -> None:
        if any_rank(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters())):
            raise TrainingDiverged(f"step {self.step}: the weights hold NaN/Inf; not saving, "
                                   f"checkpoints/latest stays on the last good checkpoint. Lower "
                                   f"optim.lr or raise optim.warmup_steps and resume from it.")
        tag = ckpt.tag_for_step(self.step)
        stage = ckpt.staging_dir(self.ckpt_root, tag)
        if self.rank == 0:  # a fresh real folder: nothing planted under that name is written through
            ckpt.make_staging_dir(self.ckpt_root, tag)
        torch.distributed.barrier()
        self.engine.save(stage, client_state={"step": self.step,
                                              "consumed_samples": self.consumed_samples})
        torch.save({**ckpt.rng_state(), "loss_guard": self.engine.guard.state_dict()},
                   os.path.join(stage, "rng", f"rank{self.rank}.pt"))
        if self.cfg.train.save_universal:  # layout-free state: resume on another layout
            reshard.save_universal(self.engine, stage)
        if self.rank == 0:
            meta = {"step": self.step, "consumed_samples": self.consumed_samples,
                    "tokens": self.consumed_samples * self.cfg.data.seq_length,
                    "family": self.cfg.model.family, "tp": self.topo.tp, "pp": self.topo.pp,
                    "dp": self.topo.dp, "zero_stage": self.cfg.parallel.zero_stage,
                    "global_batch": self.global_batch}
            ckpt.write_model_files(stage, self.cfg, None, meta, self.cfg.data.tokenizer_model)
        torch.distributed.barrier()
        if self.rank == 0:
            ckpt.publish(self.ckpt_root, tag)
            for old in ckpt.prune(self.ckpt_root, self.cfg.train.keep_last):
                _log0(self.rank, f"train.keep_last={self.cfg.train.keep_last}: deleted {old}")
        torch.distributed.barrier()
        self.saved_step = self.step

    def _resume(self) -> None:
        from ..collectives import agree_on_failure
        from .resume_check import check_resume_compatible

        folder = self._resumable_checkpoint()
        with agree_on_failure("reading the checkpoint"):
            check_resume_compatible(folder, self.cfg)  # family/backbone/shape, before any weight
            meta = ckpt.read_meta(folder)
            reshard.check_global_batch(folder, meta, self.global_batch)
        here = (self.topo.tp, self.topo.pp, self.topo.dp, self.cfg.parallel.zero_stage)
        layout = (meta.get("tp"), meta.get("pp"), meta.get("dp"), meta.get("zero_stage", here[3]))
        if layout != here:
            reshard.resume_on_new_layout(self, folder, meta)
            _log0(self.rank, f"resumed from {folder} at step {self.step} on a new layout: "
                             f"tp,pp,dp,zero {layout} -> {here} (RNG streams re-seeded)")
            return
        client = self.engine.load(folder)
        with agree_on_failure("loading the checkpoint"):  # this rank's own RNG file
            self.step, self.consumed_samples = client["step"], client["consumed_samples"]
            state = ckpt.load_rng_file(os.path.join(folder, "rng", f"rank{self.rank}.pt"))
            ckpt.set_rng_state(state)
            if "loss_guard" in state:
                self.engine.guard.load_state_dict(state["loss_guard"])
        self.saved_step = self.step
        _log0(self.rank, f"resumed from {folder} at step {self.step}")

    def _resumable_checkpoint(self) -> str:
        """The newest checkpoint every rank can read; a damaged newer one is skipped with a
        warning (each rank reads a share of the files, one all-reduce per candidate)."""
        candidates = ckpt.resume_candidates(self.ckpt_root)
        for folder in candidates:
            problem = ckpt.verify_checkpoint(folder, self.rank, self.topo.world_size)
            unsafe = problem is not None and problem.startswith(ckpt.UNSAFE)
            if unsafe:
                problem = problem[len(ckpt.UNSAFE):]
            # 2: unsafe, 1: damaged, 0: readable; the worst verdict of any rank decides
            worst = max_over_ranks(2 if unsafe else int(problem is not None))
            if worst == 2:  # every rank stops, with the file if it found it
                raise ckpt.UnsafeCheckpoint(problem or f"another rank found an unsafe file in "
                                                       f"{folder}; refusing to resume from it.")
            if problem is not None:
                print(f"[megaponder] warning: rank {self.rank}: cannot resume from {folder}: "
                      f"{problem}", flush=True)
            if worst == 0:
                if folder != candidates[0]:
                    _log0(self.rank, f"warning: resuming from the older checkpoint {folder}")
                return folder
        raise ckpt.CheckpointError(f"no checkpoint in {self.ckpt_root} can be resumed from (all "
                                   f"{len(candidates)} damaged, see the warnings above); restore "
                                   f"one or start over with train.overwrite=true.")

    # -- the loop -------------------------------------------------------------------------
    def _check_skipped(self, skipped: float) -> None:
        g, limit = self.engine.guard, self.cfg.train.max_skipped_steps
        if skipped:
            _log0(self.rank, f"warning: step {self.step}: non-finite or spiking loss/grad norm on "
                             f"some rank; update skipped ({g.skipped_in_row} in a row, "
                             f"{g.skipped_total} in all)")
        if g.skipped_in_row >= limit:
            raise TrainingDiverged(
                f"stopping at step {self.step}: {g.skipped_in_row} updates in a row were skipped "
                f"for NaN/Inf or spiking losses (train.max_skipped_steps={limit}); "
                f"checkpoints/latest stays on the last good checkpoint. Lower optim.lr, raise "
                f"optim.warmup_steps or check the data, then resume.")

    def _stop_early(self, reason: str, bar) -> dict:
        """After a stop request: save (unless this step is saved), tell how to continue."""
        if bar is not None:
            bar.close()
        if getattr(self, "saved_step", None) != self.step:
            self.save()
        self.metrics.close()
        folder = os.path.join(self.ckpt_root, ckpt.tag_for_step(self.step))
        _log0(self.rank, f"{reason}: stopped after step {self.step} of {self.cfg.train.steps}; "
                         f"saved {folder}. Continue with the same command plus "
                         f"--set train.resume=auto")
        return {"steps": self.step, "stopped": reason, "checkpoint": folder}

    def stop_before_first_step(self) -> Optional[dict]:
        """Collective: a SIGTERM/SIGINT held during start-up (megaponder.early_stop) on any
        rank makes every rank leave here, before the first step; there is nothing new to save."""
        reason = early_stop.pending()
        if not any_rank(reason is not None):
            return None
        self.metrics.close()
        folder = os.path.join(self.ckpt_root, ckpt.tag_for_step(self.step)) if self.step else None
        saved = f"nothing new to save ({folder} is on disk)" if folder else "nothing to save yet"
        _log0(self.rank, f"{reason or 'a stop request on another rank'} during start-up: {saved}; "
                         f"continue with the same command plus --set train.resume=auto")
        return {"steps": self.step, "stopped": reason or "another rank", "checkpoint": folder}

    def train_step(self) -> dict:
        micro_batches = [model_inputs(next(self.train_iter))
                         for _ in range(self.cfg.train.grad_accum_steps)]
        self.engine.step_count = self.step  # drives set_step (halting warm-up, seeded draws)
        fault_step_sleep()  # no-op unless a crash test asks for it
        phase = self.phases.apply(self.step) if self.phases is not None else None
        stats = self.engine.train_step(micro_batches)
        if phase is not None:
            stats["phase"] = phase
        return stats

    def validate(self) -> dict:
        return evaluate(self.model, self._valid_batches(), group=self.topo.dp_group)

    def run(self) -> dict:
        t = self.cfg.train
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        _log0(self.rank, f"{self.cfg.model.family}: "
                         f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters "
                         f"on rank 0, "
                         f"{self.topo.world_size} process(es) ({self.topo.describe()}), "
                         f"global batch {self.global_batch} x {self.cfg.data.seq_length} tokens")
        start, tokens_at_start = time.time(), self.consumed_samples * self.cfg.data.seq_length
        meter = ThroughputMeter(self.cfg, self.topo.world_size, self.engine.engine.device, tokens_at_start)
        profiler = StepProfiler(t.profile_steps, self.run_dir, self.rank, self.engine.engine.device)
        last_step = min(t.steps, t.exit_at_step or t.steps)
        if self.step == 0:
            for hook in self.step_hooks:
                hook(0, self.model, self.metrics)  # the step-0 baseline
        stop = StopRequest(t.preempt_signal, t.exit_after_minutes)  # SIGTERM etc. (guards.py)
        try:
            while self.step < last_step:
                profiler.before_step(self.step + 1)
                stats = self.train_step()
                self.step += 1
                profiler.after_step(self.step)
                self.consumed_samples += self.global_batch
                skipped = stats.pop("skipped")
                tokens = self.consumed_samples * self.cfg.data.seq_length
                elapsed = time.time() - start
                if self.step % t.log_every == 0 or self.step == last_step:
                    total_loss = stats.pop("loss")
                    record = {"step": self.step, "loss": stats.pop("lm_loss"), "total_loss": total_loss,
                              "lr": stats.pop("lr"), "tokens": tokens, "time_s": round(elapsed, 3),
                              "tokens_per_s": round((tokens - tokens_at_start) / max(elapsed, 1e-9), 1),
                              "grad_norm": _maybe_float(stats.pop("grad_norm")),
                              "skipped_steps": self.engine.guard.skipped_total, **stats,
                              **meter.record(tokens)}
                    if t.eval_every and self.step % t.eval_every == 0 and self.step != last_step:
                        val = self.validate()
                        record.update({"val_loss": val["loss"], "val_ppl": val["ppl"]})
                    self.metrics.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}", **meter.postfix(record))
                    else:  # batch jobs (progress_bar=false): one plain line per logged step
                        _log0(self.rank, _log_line(record, t.steps))
                    meter.mark(tokens)   # the next interval starts after this step's evaluation
                if bar is not None:
                    bar.update(1)
                for hook in self.step_hooks:
                    hook(self.step, self.model, self.metrics)
                self._check_skipped(skipped)
                if t.save_every and self.step % t.save_every == 0 and self.step != last_step:
                    self.save()
                    meter.mark(tokens)
                if self.step != last_step and stop.should_stop():
                    return self._stop_early(stop.local_reason() or "a stop request on another rank", bar)
            if bar is not None:
                bar.close()
            final_val = self.validate()
            self.metrics.write({"step": self.step, "val_loss": final_val["loss"], "val_ppl": final_val["ppl"],
                                "val_mean_iters": final_val["mean_iters"],
                                "val_flops_ratio": final_val["flops_ratio"],
                                "tokens": self.consumed_samples * self.cfg.data.seq_length,
                                "time_s": round(time.time() - start, 3)})
            self.save()  # a signal now is held until the final checkpoint is out (exit 0 anyway)
        finally:
            stop.close()
            profiler.close()
        self.metrics.close()
        summary = {"steps": self.step, "val_ppl": final_val["ppl"], "val_loss": final_val["loss"],
                   "mean_iters": final_val["mean_iters"], "flops_ratio": final_val["flops_ratio"],
                   "val_tokens": final_val["tokens"],
                   "tokens": self.consumed_samples * self.cfg.data.seq_length,
                   "wall_s": time.time() - start,
                   "checkpoint": os.path.join(self.ckpt_root, ckpt.tag_for_step(self.step))}
        if self.rank == 0:
            self._print_summary(summary)
        return summary

    def _print_summary(self, s: dict) -> None:
        baseline = _unigram_baseline(self.cfg)
        rows = [("family", self.cfg.model.family), ("steps", str(s["steps"])),
                ("tokens", f"{s['tokens']:,}"),
                ("validation ppl", f"{s['val_ppl']:.2f}"
                 + (f"   (unigram baseline {baseline:.1f})" if baseline else "")),
                ("  scored on", _validation_scope(self.cfg, s.get("val_tokens", 0))),
                ("backbone passes/token", f"{s['mean_iters']:.3f}   (mean_iters: the papers' ratio)"),
                ("inference FLOPs vs vanilla", f"{s['flops_ratio']:.3f}   (flops_ratio: head and "
                 f"pondering embedding included)"),
                ("wall time", f"{s['wall_s']:.1f} s"),
                ("checkpoint", s["checkpoint"])]
        print("\n[megaponder] training finished\n" + format_summary(rows), flush=True)


def _training_device() -> torch.device:
    """The device DeepSpeed's accelerator will train on (before the engine exists)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _log_line(record: dict, total_steps: int) -> str:
    """``step 10/100 | loss 5.1234 | lr 1.00e-03 | ...`` for logs without a progress bar."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"tokens {record['tokens']:,}",
             f"tok/s {record['tokens_per_s']:,.0f}"]
    for key in ("grad_norm", "mean_iters", "val_loss", "val_ppl"):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{key} {record[key]:.4g}")
    return " | ".join(parts)


def _validation_scope(cfg: Config, tokens: int) -> str:
    """Which tokens the summary's validation perplexity covers, so it is not mistaken for
    ``megaponder eval`` on the whole file (the same computation on more windows)."""
    windows = tokens // max(cfg.data.seq_length, 1)
    if cfg.data.valid_path:
        return (f"first {windows} windows x {cfg.data.seq_length} tokens of data.valid_path "
                f"(train.eval_batches); `megaponder eval` scores the whole file")
    return f"{windows} held-out windows x {cfg.data.seq_length} tokens of data.path"


def _maybe_float(value) -> Optional[float]:
    # NaN stays NaN (Python's json writes it as NaN): a null would hide a diverging run
    return None if value is None else float(value)


def _unigram_baseline(cfg: Config) -> Optional[float]:
    """The demo corpus records a unigram perplexity next to its data (data/demo/stats.json)."""
    prefixes = cfg.data.valid_path or cfg.data.path or []
    for prefix in prefixes:
        path = os.path.join(os.path.dirname(str(prefix)), "stats.json")
        if os.path.exists(path):
            stats = json.load(open(path))
            for key, value in stats.items():
                if "unigram" in key and isinstance(value, (int, float)):
                    return float(value)
    return None


def train(cfg: Config, step_hooks: Sequence[StepHookFactory] = ()) -> dict:
    trainer = None
    try:
        trainer = Trainer(cfg, step_hooks)
        summary = trainer.stop_before_first_step() or trainer.run()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return summary
    except BaseException as err:
        from ..collectives import describe_peer_loss, describe_timeout

        timeout = describe_timeout(err, cfg.parallel.timeout_minutes) or describe_peer_loss(err)
        # an error exit with a live gloo group can abort at interpreter shutdown ("terminate
        # called without an active exception", rc 134) instead of the CLI's one line and code
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if timeout is not None:
            raise timeout from err
        raise
    finally:
        if trainer is not None:
            trainer.close()  # the run-dir lock; the kernel also drops it if we are killed
