"""Tensor, sequence, pipeline and data parallelism (DeepSpeed ZeRO) for every family.

Trainer-facing API (see docs/parallelism.md); the engine and the config-checked start-up
live in the train layer (megaponder.train.engine, megaponder.train.preflight)::

    topo = topology_from_config(cfg)            # or init_distributed(tp, pp, ...)
    model = parallelize(build_model(cfg), cfg, topo)
    engine = build_engine(model, cfg, topo, lr_lambda=...)
    stats = engine.train_step(batch)            # one optimizer step
    full = gather_full_state_dict(engine.module, topo)   # rank 0, single-device names
"""
from .parallelize import (gather_full_state_dict, load_full_state_dict, parallelize,
                          shard_state_dict)
from .state import (RNG, Topology, build_topology, init_distributed, launcher_env,
                    seed_everything, strip_local_rank_arg)
from .tensor import gather_logits

__all__ = ["gather_full_state_dict",
           "load_full_state_dict", "parallelize", "shard_state_dict", "RNG", "Topology",
           "build_topology", "init_distributed", "launcher_env", "seed_everything",
           "strip_local_rank_arg", "gather_logits"]
