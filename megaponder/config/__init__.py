"""One typed config tree, loaded from YAML with ``--set`` overrides and checked once.

    cfg = load_config("examples/configs/tiny.yml", ["train.steps=20", "model.family=adaponderlm"])

Unknown keys are rejected with the nearest valid name; every cross-field rule lives in
:func:`validate` and says what to change. ``docs/config.md`` is generated from the field
docstrings (``python -m megaponder.config``) and kept current by a test.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import yaml

from .analysis import AnalysisConfig
from .base import ConfigError, _nearest, coerce, field_docs, from_dict, param, short, to_dict
from .data import DataConfig
from .parallel import ParallelConfig
from .train import OptimConfig, TrainConfig, train_config_problems
from .yaml_io import load_yaml_file, parse_yaml
# the model's sections live in the model core (copied into Hugging Face exports)
from ..models.args import FAMILIES, ModelConfig, known_families
from ..models.ponder_args import PonderConfig

__all__ = [
    "AnalysisConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PonderConfig", "TrainConfig", "FAMILIES", "load_config", "validate", "config_from_dict",
    "config_problems", "raise_problems",
]


@dataclass
class Config:
    model: ModelConfig = param(help="Backbone and family.", factory=ModelConfig)
    ponder: PonderConfig = param(help="Pondering-family settings.", factory=PonderConfig)
    parallel: ParallelConfig = param(help="Parallel layout.", factory=ParallelConfig)
    data: DataConfig = param(help="Datasets.", factory=DataConfig)
    optim: OptimConfig = param(help="Optimizer and schedule.", factory=OptimConfig)
    train: TrainConfig = param(help="Training loop.", factory=TrainConfig)
    analysis: AnalysisConfig = param(help="Measurements during training.", factory=AnalysisConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value (e.g. train.steps=20), got '{assignment}'.")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section.")
        node = child
    # the value is YAML, so lists and mappings work: --set data.path=[a,b] (see docs/config.md)
    node[parts[-1]] = parse_yaml(raw, f"--set {key}") if raw.strip() else ""


def config_from_dict(tree: dict, check_paths: bool = True) -> Config:
    cfg = from_dict(Config, tree)
    validate(cfg, check_paths=check_paths)
    return cfg


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), *,
                check_paths: bool = True) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"Config file '{path}' does not exist.")
        tree = load_yaml_file(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections "
                              f"(model:, train:, ...).")
    for assignment in overrides:
        _apply_override(tree, assignment)
    return config_from_dict(tree, check_paths=check_paths)


def _data_prefixes(paths: Optional[list[str]]) -> list[str]:
    """Prefixes in a (possibly weighted) Megatron-style data list."""
    if not paths:
        return []
    try:
        float(paths[0])
        weighted = len(paths) % 2 == 0
    except ValueError:
        weighted = False
    return list(paths[1::2]) if weighted else list(paths)


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Every rule that reads the config alone, each failing with a message that says what to
    change. The rules owned by the model layer (backbones, family specs) and those that need
    the world size run in the train layer's preflight (megaponder/train/preflight.py)."""
    raise_problems(config_problems(cfg, check_paths=check_paths))


def raise_problems(problems: list[str]) -> None:
    """One ConfigError listing ``problems`` (nothing when there are none)."""
    if len(problems) == 1:
        raise ConfigError(f"Invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def config_problems(cfg: Config, *, check_paths: bool = True) -> list[str]:
    """The one-line problems of :func:`validate` (an unknown family raises at once)."""
    m, p, par, d, t, o = cfg.model, cfg.ponder, cfg.parallel, cfg.data, cfg.train, cfg.optim
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    families = known_families()
    if m.family not in families:
        raise ConfigError(f"model.family: {short(m.family)} is not one of {list(families)}."
                          f"{_nearest(str(m.family)[:100], list(families))}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        need(getattr(m, name) > 0, f"model.{name} must be positive (got {getattr(m, name)}).")
    if m.num_heads > 0:
        need(m.hidden_size % m.num_heads == 0,
             f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}; "
             f"choose a head count that divides it (e.g. {_divisor_near(m.hidden_size, m.num_heads)}).")
    need(m.make_vocab_size_divisible_by > 0, f"model.make_vocab_size_divisible_by must be "
         f"positive (got {m.make_vocab_size_divisible_by}); GPT-NeoX uses 128.")
    need(m.rotary_pct is None or 0.0 <= m.rotary_pct <= 1.0,
         f"model.rotary_pct must lie in [0, 1] (got {m.rotary_pct}).")
    if m.padded_vocab_size is not None:
        need(m.padded_vocab_size >= m.vocab_size,
             f"model.padded_vocab_size={m.padded_vocab_size} is smaller than vocab_size={m.vocab_size}.")
    need(d.seq_length > 0, f"data.seq_length must be positive (got {d.seq_length}).")
    need(p.router_temperature > 0, f"ponder.router_temperature must be > 0 (got {p.router_temperature}).")
    need(p.router_warmup_steps >= 0, f"ponder.router_warmup_steps must be >= 0 (got {p.router_warmup_steps}).")
    need(p.router_lr_mult > 0, f"ponder.router_lr_mult must be > 0 (got {p.router_lr_mult}); "
         "1.0 trains the router at optim.lr.")
    need(0.0 < p.penalty_prior_halt < 1.0, f"ponder.penalty_prior_halt must lie in (0, 1) "
         f"(got {p.penalty_prior_halt}).")
    need(p.steps >= 0, f"ponder.steps must be >= 0 (got {p.steps}).")
    need(0.0 < p.tau < 1.0, f"ponder.tau must lie in (0, 1) (got {p.tau}).")
    need(0.0 <= p.halting_k_max <= 1.0, f"ponder.halting_k_max must lie in [0, 1] (got {p.halting_k_max}).")
    need(p.halting_warmup_end >= p.halting_warmup_start,
         "ponder.halting_warmup_end must be >= ponder.halting_warmup_start.")
    need(bool(p.jacobi_passes) and all(j >= 0 for j in p.jacobi_passes),
         "ponder.jacobi_passes must be a non-empty list of non-negative integers.")
    need(p.target_mean_iters is None or p.target_flops_ratio is None,
         "ponder.target_mean_iters and ponder.target_flops_ratio are both set; keep one (mean_iters "
         "is the papers' passes/token scale, flops_ratio the full inference-FLOPs scale).")
    need(not p.train_compaction or (p.halted_readout == "last_active" and p.bottomk_pool == "active"),
         "ponder.train_compaction is exact only with ponder.halted_readout=last_active and "
         "ponder.bottomk_pool=active (otherwise halted tokens' later passes reach the loss); "
         "set those or ponder.train_compaction=false.")
    need(not p.train_compaction or (par.tp == 1 and par.pp == 1),
         f"ponder.train_compaction is not implemented with parallel.tp={par.tp} / "
         f"parallel.pp={par.pp}; set ponder.train_compaction=false or tp=pp=1.")
    need(p.eval_jacobi_tol > 0, f"ponder.eval_jacobi_tol must be positive (got {p.eval_jacobi_tol}).")
    # training loop
    for name in ("steps", "micro_batch_size", "grad_accum_steps", "log_every"):
        need(getattr(t, name) > 0, f"train.{name} must be positive (got {getattr(t, name)}).")
    if t.global_batch_size is not None:
        need(t.global_batch_size > 0 and t.global_batch_size % max(t.micro_batch_size, 1) == 0,
             f"train.global_batch_size={t.global_batch_size} must be a positive multiple of "
             f"train.micro_batch_size={t.micro_batch_size}.")
    for i, phase in enumerate(t.phases):
        last = i == len(t.phases) - 1
        need(phase.tokens is None and last or phase.tokens is not None and phase.tokens > 0,
             f"train.phases[{i}].tokens must be a positive token count"
             + ("" if last else " (only the last phase may leave it null: until train.steps)") + ".")
        need(phase.lr is None or phase.lr > 0, f"train.phases[{i}].lr must be positive (or null).")
    need(not (t.phases and p.freeze_backbone),
         "ponder.freeze_backbone=true and train.phases both freeze the backbone; with phases set "
         "train.phases[i].freeze_backbone per phase and ponder.freeze_backbone=false.")
    need(t.save_every >= 0 and t.eval_every >= 0, "train.save_every / train.eval_every must be >= 0.")
    problems.extend(train_config_problems(t))
    need(0 < o.lr < float("inf"), f"optim.lr must be a positive finite number (got {o.lr}).")
    need(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping).")
    a = cfg.analysis
    need(a.fprinciple_every >= 0, f"analysis.fprinciple_every must be >= 0 (got {a.fprinciple_every}).")
    need(a.fprinciple_probes >= 2 and a.fprinciple_context >= 1 and a.fprinciple_scan_tokens > a.fprinciple_context,
         "analysis.fprinciple_probes must be >= 2, fprinciple_context >= 1 and "
         "fprinciple_scan_tokens larger than the context.")
    need(a.fprinciple_every == 0 or (par.tp == 1 and par.pp == 1),
         f"analysis.fprinciple_every={a.fprinciple_every} needs parallel.tp=1 and parallel.pp=1 (the "
         f"probe runs the whole model on each rank); set it to 0 and run "
         f"tools/analyze_fprinciple.py on saved checkpoints instead.")
    # parallel layout
    need(par.tp >= 1 and par.pp >= 1, "parallel.tp and parallel.pp must be >= 1.")
    need(par.pipeline_chunks >= 1, f"parallel.pipeline_chunks must be >= 1 (got {par.pipeline_chunks}).")
    need(par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0-3 (got {par.zero_stage}).")
    # Since DeepSpeed's "non-ZeRO mode" (deepspeedai/DeepSpeed#7515) stage 0 is plain DDP,
    # whose bf16 path accumulates gradients in bf16 only; the fp32 gradient accumulation (and
    # fp32 master weights) megaponder asks for exist from stage 1 on. Without this rule
    # deepspeed.initialize fails with "unsupported mix of model_dtype=torch.bfloat16 and
    # grad_accum_dtype=torch.float32".
    need(not (t.precision == "bf16" and par.zero_stage == 0),
         "train.precision=bf16 needs parallel.zero_stage>=1 (DeepSpeed's stage 0 has no fp32 "
         "gradient accumulation for bf16); set parallel.zero_stage=1 (as the example configs do) "
         "or train.precision=fp32.")
    if par.tp > 1:
        need(m.num_heads % par.tp == 0,
             f"parallel.tp={par.tp} does not divide model.num_heads={m.num_heads}; pick a tp that "
             f"divides the head count.")
        need(m.kv_heads % par.tp == 0,
             f"parallel.tp={par.tp} does not divide model.num_kv_heads={m.kv_heads}; pick a tp "
             f"that divides the key/value head count.")
        need(m.ffn_size % par.tp == 0,
             f"parallel.tp={par.tp} does not divide the MLP width {m.ffn_size}.")
    vocab_shards = par.tp * (par.pp if par.shard_vocab_over_pp and par.pp > 1 else 1)
    if m.make_vocab_size_divisible_by > 0 and vocab_shards >= 1:
        # Unlike Megatron (multiple = divisible_by x tp), the padded vocabulary does not depend
        # on the layout, so a checkpoint moves between layouts; a tp that cannot split it is
        # refused here rather than silently padded further.
        need(m.padded_vocab() % vocab_shards == 0,
             f"the padded vocabulary {m.padded_vocab()} does not split into {vocab_shards} equal "
             f"shards (parallel.tp" + (" x parallel.pp, shard_vocab_over_pp" if vocab_shards != par.tp else "")
             + f"); set model.padded_vocab_size or model.make_vocab_size_divisible_by to a multiple "
             f"of {vocab_shards}.")
    need(p.top_k == 0 or vocab_shards == 1,
         f"ponder.top_k={p.top_k} is not supported with a vocabulary split over {vocab_shards} "
         f"ranks (the vocab-parallel pondering embedding uses the full softmax); set it to 0.")
    if par.shard_vocab_over_pp and par.pp > 1:
        need(not par.sequence_parallel,
             "parallel.shard_vocab_over_pp cannot be combined with parallel.sequence_parallel "
             "(the embedding's reduce-scatter runs over the TP group); set one of them to false.")
    if par.pp > 1:
        need(m.num_layers % par.pp == 0,
             f"parallel.pp={par.pp} does not divide model.num_layers={m.num_layers}; choose pp "
             f"among the divisors of the layer count.")
        need(par.zero_stage <= 1,
             f"parallel.zero_stage={par.zero_stage} cannot be combined with parallel.pp={par.pp}: "
             f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only. Set parallel.zero_stage=1.")
    need(not par.sequence_parallel or par.tp > 1,
         "parallel.sequence_parallel=true needs parallel.tp > 1.")
    if par.sequence_parallel and par.tp > 1:
        need(d.seq_length % par.tp == 0,
             f"parallel.sequence_parallel splits the sequence over tp={par.tp} ranks, but "
             f"data.seq_length={d.seq_length} is not a multiple of it; change one of them.")
    need(m.loss_chunk_size >= 0, f"model.loss_chunk_size must be >= 0 (got {m.loss_chunk_size}).")
    need(not m.loss_chunk_size or (par.tp == 1 and par.zero_stage < 3),
         f"model.loss_chunk_size={m.loss_chunk_size} needs parallel.tp=1 and zero_stage<3 (it reads "
         f"the head weight outside the head module); set it to 0 for this layout.")
    need(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops must be positive or null.")
    need(not t.profile_steps or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
         f"train.profile_steps must be [first, last] with 1 <= first <= last (got {t.profile_steps}).")
    need(cfg.parallel.zero_bucket_size >= 1, "parallel.zero_bucket_size must be >= 1 (elements).")
    need(t.memory_gb is None or t.memory_gb > 0, "train.memory_gb must be positive or null.")
    if check_paths:
        prefixes = _data_prefixes(d.path) + _data_prefixes(d.valid_path)
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                need(os.path.exists(prefix + ext),
                     f"data.path: '{prefix}{ext}' does not exist. Prepare the data first (e.g. "
                     f"`python tools/prepare_demo_corpus.py`) or point data.path at an existing "
                     f"PREFIX (without .bin/.idx).")
        if d.tokenizer_model is not None:
            need(os.path.exists(d.tokenizer_model),
                 f"data.tokenizer_model: {short(d.tokenizer_model, 300)} does not exist.")
        if t.init_checkpoint is not None:
            need(os.path.exists(t.init_checkpoint),
                 f"train.init_checkpoint: {short(t.init_checkpoint, 300)} does not exist.")
    return problems


def _divisor_near(n: int, k: int) -> int:
    """The divisor of n nearest to k (searching outwards from k: bounded work for any n)."""
    for d in range(0, min(max(k, n - k), 1 << 16) + 1):
        for c in (k - d, k + d):
            if 1 <= c <= n and n % c == 0:
                return c
    return 1


def _type_name(tp) -> str:
    import typing
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if args:
        inner = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in inner)
        if origin is list:
            name = f"list of {name}"
        return name + (" (or null)" if len(inner) < len(args) else "")
    return getattr(tp, "__name__", str(tp))


def reference_markdown() -> str:
    """The generated ``docs/config.md``."""
    lines = ["# Configuration reference", "",
             "Generated from the dataclasses in `megaponder/config/` by "
             "`python -m megaponder.config > docs/config.md`; a test keeps it current.", "",
             "Every key can be set in YAML (nested sections) or on the command line with "
             "`--set section.key=value`.", "",
             "A `--set` value is read as YAML, so lists and mappings work: "
             "`--set data.path=[data/a_text_document,data/b_text_document]`, a weighted blend "
             "`--set 'data.path=[0.7, data/a, 0.3, data/b]'`, `--set ponder.jacobi_passes=[1,2]`; a "
             "single value for a list key becomes a one-element list (`--set data.path=data/a`). "
             "Quote the whole argument in the shell when it contains spaces. An empty value "
             "(`--set train.run_dir=`) is the empty string, which validation refuses for paths.", "",
             "Config files are read strictly: a YAML syntax error is reported as "
             "`FILE:LINE:COLUMN: YAML syntax error: ...`, and a key given twice in one mapping (at any "
             "depth, e.g. two `train:` sections) is an error naming the key and both lines instead "
             "of the second silently replacing the first. YAML merge keys (`<<: *anchor`) may still "
             "be overridden.", ""]
    for section in dataclasses.fields(Config):
        lines += [f"## `{section.name}`", "", section.metadata["help"], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, help_text in field_docs(section.type if isinstance(section.type, type)
                                                      else type(getattr(Config(), section.name)),
                                                      section.name):
            lines.append(f"| `{key}` | {_type_name(tp)} | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)
