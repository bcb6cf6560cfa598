"""The start-up check of a run: every config rule, including those the config layer cannot
own, and the process groups built only once the config passed.

megaponder.config checks what the config says about itself. The rules here need a higher
layer: the backbone's own rules (models/backbones.py), the family's traits (its FamilySpec:
whether a latent layout bounds only the token count, whether the family supports sequence
parallelism) and the job's world size (divisibility, the global batch). ``preflight`` runs
both sets and reports every problem in one ConfigError.

    cfg = load_run_config("examples/configs/tiny.yml", ["model.backbone=llama"])
    topo = topology_from_config(cfg)    # process groups; preflight with the world size, agreed
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch.distributed as dist

from ..collectives import agree_on_failure
from ..config import Config, ConfigError, config_problems, load_config, raise_problems
from ..data.schedule import batch_mismatch_message
from ..models.backbones import backbone_problems
from ..models.spec import family_names, family_spec
from ..parallel.state import Topology, build_topology, init_process_group, seed_everything


def model_layer_problems(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    """The rules owned by the model layer and the job size, one line each."""
    m, d, par, t = cfg.model, cfg.data, cfg.parallel, cfg.train
    problems = list(backbone_problems(m))
    # latent layouts repeat a token's position id for its thoughts (spec kind), so only the
    # token count is bounded
    if d.seq_length > m.max_position_embeddings and family_spec(m.family).kind != "latent":
        problems.append(f"data.seq_length={d.seq_length} exceeds model.max_position_embeddings="
                        f"{m.max_position_embeddings}; raise the latter or shorten the former.")
    if par.sequence_parallel and par.tp > 1 and not family_spec(m.family).sequence_parallel:
        supported = [f for f in family_names() if family_spec(f).sequence_parallel]
        problems.append(f"parallel.sequence_parallel is supported for {', '.join(supported)}, "
                        f"not model.family={m.family} (its FamilySpec declares no sequence_parallel: "
                        f"its stack calls are not full-length final-normed sequences); set it to false.")
    if world_size is not None:
        mp = par.tp * par.pp
        if world_size % mp:
            problems.append(f"world size {world_size} is not a multiple of tp*pp={mp}; launch a "
                            f"multiple of {mp} processes or change parallel.tp/pp.")
        elif t.global_batch_size and t.micro_batch_size > 0:
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                problems.append(batch_mismatch_message(t.global_batch_size, t.micro_batch_size, dp))
    return problems


def preflight(cfg: Config, *, check_paths: bool = True, world_size: Optional[int] = None) -> None:
    """Every rule of the config and of the layers it names; one ConfigError listing them."""
    raise_problems(config_problems(cfg, check_paths=check_paths) + model_layer_problems(cfg, world_size))


def load_run_config(path: Optional[str] = None, overrides: Iterable[str] = (), *,
                    check_paths: bool = True) -> Config:
    """:func:`megaponder.config.load_config` followed by :func:`preflight`."""
    cfg = load_config(path, overrides, check_paths=check_paths)
    preflight(cfg, check_paths=False)
    return cfg


def topology_from_config(cfg: Config) -> Topology:
    """init_distributed with the ``parallel:`` section of a Config. The config passes
    :func:`preflight` (with the world size) after the default group exists and before any other
    group is made, with the ranks agreeing on the verdict, so a config that fails on one rank
    only (another file on its node) stops every rank instead of leaving them waiting in
    ``new_group``."""
    par = cfg.parallel
    if not par.timeout_minutes > 0:  # the rendezvous needs it, so before preflight()
        raise ConfigError(f"parallel.timeout_minutes must be positive (got {par.timeout_minutes}).")
    init_process_group(par.dist_backend, par.timeout_minutes)
    with agree_on_failure("config"):
        preflight(cfg, check_paths=False, world_size=dist.get_world_size())
    # the default group exists already: the rest of init_distributed
    topo = build_topology(par.tp, par.pp, par.sequence_parallel, par.timeout_minutes)
    seed_everything(cfg.train.seed, topo)
    return topo
