"""Checkpoints: complete or absent, loadable without the job that wrote them.

Layout of ``<run_dir>/checkpoints/``::

    latest                    text file naming the newest complete tag
    global_step20/
      config.yml              the run's resolved config
      meta.json               step, consumed samples/tokens, family, parallel layout
      model.pt                full (unsharded) state dict: what load_model reads
      tokenizer.*             copy of the tokenizer, so generate/eval need nothing else
      deepspeed/              DeepSpeed engine state (optimizer, scheduler) for resume
      rng/rank<N>.pt          every rank's RNG streams for exact resume

Every rank writes into ``.tmp-<tag>/``; after a barrier rank 0 renames it to ``<tag>`` and
then rewrites ``latest`` by atomic replace, so a crash leaves either the old or the new
checkpoint, never a partial one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

from ..config import Config, config_from_dict

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yml"


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    from ..parallel.state import RNG
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(), "tensor_parallel": RNG.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from ..parallel.state import RNG
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "tensor_parallel" in state:
        RNG.load_state_dict(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def staging_dir(ckpt_root: str, tag: str) -> str:
    return os.path.join(ckpt_root, f".tmp-{tag}")


def publish(ckpt_root: str, tag: str) -> str:
    """Rank 0, after every rank finished writing the staging folder."""
    final = os.path.join(ckpt_root, tag)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging_dir(ckpt_root, tag), final)
    _write_atomic(os.path.join(ckpt_root, "latest"), tag + "\n")
    return final


def write_model_files(folder: str, cfg: Config, state_dict: Optional[dict], meta: dict,
                      tokenizer_path: Optional[str] = None) -> None:
    """The parts of a checkpoint that load_model needs (also what conversion writes).
    ``state_dict=None`` when the caller wrote model.pt itself (the parallel engine does)."""
    os.makedirs(folder, exist_ok=True)
    if state_dict is not None:
        torch.save(state_dict, os.path.join(folder, MODEL_FILE))
    _write_atomic(os.path.join(folder, CONFIG_FILE), cfg.to_yaml())
    if tokenizer_path and os.path.exists(tokenizer_path):
        dest = os.path.join(folder, "tokenizer" + os.path.splitext(tokenizer_path)[1])
        shutil.copyfile(tokenizer_path, dest)
        meta = {**meta, "tokenizer": os.path.basename(dest)}
    _write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=2) + "\n")


def latest_tag(ckpt_root: str) -> Optional[str]:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.exists(path):
        return None
    tag = open(path).read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_root, tag)) else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from a checkpoint folder, a checkpoints/ folder or a run dir."""
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        tag = latest_tag(root)
        if tag is not None:
            return os.path.join(root, tag)
    raise FileNotFoundError(
        f"'{path}' is neither a megaponder checkpoint (no {MODEL_FILE}) nor a run directory "
        f"with checkpoints/latest. Pass a run dir, runs/X/checkpoints/<tag>, or the --output of "
        f"tools/convert_checkpoint.py.")


def read_checkpoint_config(folder: str) -> Config:
    import yaml

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return config_from_dict(yaml.safe_load(f), check_paths=False)


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    return json.load(open(path)) if os.path.exists(path) else {}


def tokenizer_file(folder: str) -> Optional[str]:
    name = read_meta(folder).get("tokenizer")
    return os.path.join(folder, name) if name else None


def load_model(path: str, map_location: str = "cpu"):
    """The model of a megaponder checkpoint (or run dir), on CPU, in eval mode."""
    from ..models import build_model

    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    model = build_model(cfg)
    state = torch.load(os.path.join(folder, MODEL_FILE), map_location=map_location, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match a '{cfg.model.family}' model: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
