"""Checkpoints: complete or absent, loadable without the job that wrote them.

Layout of ``<run_dir>/checkpoints/``::

    latest                    text file naming the newest complete tag
    global_step20/
      config.yml              the run's resolved config
      meta.json               step, consumed samples/tokens, family, parallel layout
      model.pt                full (unsharded) state dict: what load_model reads
      tokenizer.*             copy of the tokenizer, so generate/eval need nothing else
      deepspeed/              DeepSpeed engine state (optimizer, scheduler) for resume
      rng/rank<N>.pt          every rank's RNG streams (and loss-guard state) for exact resume

Every rank writes into ``.tmp-<tag>/``; after a barrier rank 0 fsyncs it, moves an existing
``<tag>`` aside to ``.old-<tag>`` (never deleting first), renames the staging folder to
``<tag>``, fsyncs the folder, rewrites ``latest`` by atomic replace and only then deletes the
aside copy. A kill at any moment leaves a complete checkpoint that :func:`recover` (run at the
start of every training job) puts back in place.

Loading never unpickles code: every ``torch.load`` here is ``weights_only=True`` (RNG states
are stored as tensors and plain Python values for that), ``latest`` must name a
``global_step<N>`` folder of the same ``checkpoints/`` folder, and a damaged or unsafe file
stops with one line naming it (:class:`CheckpointError`).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, config_from_dict

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yml"
LATEST_FILE = "latest"
TAG_RE = re.compile(r"global_step(\d+)")


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, damaged or unsafe to load; the message names it.
    A ConfigError, so the command line prints it as one line (exit 2)."""


class UnsafeCheckpoint(CheckpointError):
    """A file that pickles code (or classes outside the allow-list). Never a reason to fall
    back to an older checkpoint silently: someone changed the run dir."""


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> Optional[int]:
    m = TAG_RE.fullmatch(tag)
    return int(m.group(1)) if m else None


def fsync_dir(path: str) -> None:
    """Make a rename/create inside ``path`` durable (POSIX: the folder entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder below ``root`` (before a checkpoint is published, so a
    power loss cannot leave ``latest`` naming a folder whose data never reached the disk)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def safe_load(path: str, map_location: Any = "cpu", what: str = "checkpoint file",
              allow: tuple = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file: refuses pickled
    code (anything but tensors, plain containers/numbers/strings and the ``allow`` classes)
    and damaged files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} is missing.")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(
            f"{what} {path} holds pickled objects other than tensors and plain values; "
            f"refusing to load it (it could run code): {_first_line(err)}") from None
    except Exception as err:  # truncated zip, bad magic, short read, ...
        raise CheckpointError(f"{what} {path} is damaged or truncated ({type(err).__name__}: "
                              f"{_first_line(err)}); restore it or use another checkpoint.") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# -- RNG state, in a form weights_only loading accepts (tensors, ints, floats, strings) ----
def rng_state() -> dict:
    from ..parallel.state import RNG
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": int(version), "state": list(py_state), "gauss": py_gauss},
             "tensor_parallel": RNG.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def legacy_rng_globals() -> tuple:
    """RNG files written before megaponder stored them as plain values hold numpy's state
    array: numpy's array reconstruction only (no object arrays: those need more globals)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    return (np.dtype, np.ndarray, core.multiarray._reconstruct, type(np.dtype(np.uint32)))


def load_rng_file(path: str) -> dict:
    return safe_load(path, what="RNG state", allow=legacy_rng_globals())


def set_rng_state(state: dict) -> None:
    from ..parallel.state import RNG
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    if isinstance(p, dict):
        p = (p["version"], tuple(p["state"]), p["gauss"])
    random.setstate(p)
    if "tensor_parallel" in state:
        RNG.load_state_dict(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- publishing and recovery --------------------------------------------------------------
def staging_dir(ckpt_root: str, tag: str) -> str:
    return os.path.join(ckpt_root, f".tmp-{tag}")


def aside_dir(ckpt_root: str, tag: str) -> str:
    return os.path.join(ckpt_root, f".old-{tag}")


def _fault_kill(point: str) -> None:
    """Fault injection for the crash tests: ``MEGAPONDER_FAULT_KILL=<point>`` SIGKILLs this
    process at that point of :func:`publish` (``aside``: the old tag is moved aside, the new
    one not yet in place). Test-only; never set it in a real job."""
    if os.environ.get("MEGAPONDER_FAULT_KILL") == point:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def publish(ckpt_root: str, tag: str) -> str:
    """Rank 0, after every rank finished writing the staging folder. Never deletes a complete
    checkpoint before its replacement is in place (see the module docstring)."""
    final, stage, aside = (os.path.join(ckpt_root, tag), staging_dir(ckpt_root, tag),
                           aside_dir(ckpt_root, tag))
    fsync_tree(stage)
    if os.path.exists(aside):  # left by an earlier crash after `final` was back in place
        shutil.rmtree(aside)
    if os.path.exists(final):
        os.replace(final, aside)
        fsync_dir(ckpt_root)
        _fault_kill("aside")
    os.replace(stage, final)
    fsync_dir(ckpt_root)
    _write_atomic(os.path.join(ckpt_root, LATEST_FILE), tag + "\n")
    if os.path.exists(aside):
        shutil.rmtree(aside)
    return final


def recover(ckpt_root: str) -> list[str]:
    """Undo what a kill inside :func:`publish` or a save left behind (rank 0, holding the
    run-dir lock): an ``.old-<tag>`` whose ``<tag>`` is missing goes back in place, one whose
    ``<tag>`` was published is deleted, staging folders are deleted. Returns what it did."""
    done = []
    if not os.path.isdir(ckpt_root):
        return done
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if name.startswith(".old-"):
            final = os.path.join(ckpt_root, name[len(".old-"):])
            if os.path.exists(final):
                shutil.rmtree(path)
                done.append(f"deleted {name} (its replacement is complete)")
            else:
                os.replace(path, final)
                done.append(f"restored {name[len('.old-'):]} from {name} (a save was interrupted)")
        elif name.startswith(".tmp-") and os.path.isdir(path):
            shutil.rmtree(path)
            done.append(f"deleted the unfinished {name}")
    if done:
        fsync_dir(ckpt_root)
    return done


def complete_tags(ckpt_root: str) -> list[str]:
    """``global_step<N>`` folders that hold a meta.json (written last into the staging
    folder), newest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [t for t in os.listdir(ckpt_root) if tag_step(t) is not None
            and os.path.isfile(os.path.join(ckpt_root, t, META_FILE))]
    return sorted(tags, key=tag_step, reverse=True)


def prune(ckpt_root: str, keep_last: int) -> list[str]:
    """Retention: keep the ``keep_last`` newest complete checkpoints (0 keeps all) and never
    the one ``latest`` names. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    latest = latest_tag(ckpt_root)
    gone = [t for t in complete_tags(ckpt_root)[keep_last:] if t != latest]
    for tag in gone:
        shutil.rmtree(os.path.join(ckpt_root, tag))
    return gone


def verify_checkpoint(folder: str, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """What is wrong with checkpoint ``folder`` for resuming on ``rank`` of ``world_size``, or
    None. No collectives: rank r fully reads (``weights_only``) every world_size-th file, so
    the ranks together read the checkpoint once; the caller combines the verdicts. An unsafe
    file is reported with the prefix :data:`UNSAFE` (the caller stops instead of falling back)."""
    try:
        meta = read_meta(folder)
        read_checkpoint_config(folder)
        for name in (META_FILE, MODEL_FILE, "deepspeed"):
            if not os.path.exists(os.path.join(folder, name)):
                return f"{os.path.join(folder, name)} is missing"
        # A resume on another world size re-seeds the RNG streams (train/reshard.py), so only
        # a same-size resume needs this rank's own RNG file.
        saved_world = meta.get("tp", 1) * meta.get("pp", 1) * meta.get("dp", 1)
        own_rng = os.path.join(folder, "rng", f"rank{rank}.pt")
        if saved_world == world_size and not os.path.isfile(own_rng):
            return f"{own_rng} is missing"
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                       if f.endswith(".pt"))
        from ..parallel.engine import deepspeed_safe_globals
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            for path in files[rank::world_size]:
                load_rng_file(path) if os.path.basename(os.path.dirname(path)) == "rng" else safe_load(path)
    except UnsafeCheckpoint as err:
        return UNSAFE + str(err)
    except CheckpointError as err:
        return str(err)
    return None


UNSAFE = "unsafe: "


def resume_candidates(ckpt_root: str) -> list[str]:
    """Folders to try on resume: the one ``latest`` names, then older complete ones."""
    latest = latest_tag(ckpt_root, must_exist=False)
    tags = complete_tags(ckpt_root)
    if latest is not None:
        tags = [latest] + [t for t in tags if tag_step(t) < tag_step(latest)]
    return [os.path.join(ckpt_root, t) for t in tags]


def write_model_files(folder: str, cfg: Config, state_dict: Optional[dict], meta: dict,
                      tokenizer_path: Optional[str] = None) -> None:
    """The parts of a checkpoint that load_model needs (also what conversion writes).
    ``state_dict=None`` when the caller wrote model.pt itself (the parallel engine does)."""
    os.makedirs(folder, exist_ok=True)
    if state_dict is not None:
        torch.save(state_dict, os.path.join(folder, MODEL_FILE))
    _write_atomic(os.path.join(folder, CONFIG_FILE), cfg.to_yaml())
    if tokenizer_path and os.path.exists(tokenizer_path):
        from ..data.tokenizer import copy_tokenizer  # a folder or GPT-2 pair becomes one file
        meta = {**meta, "tokenizer": copy_tokenizer(tokenizer_path, folder)}
    _write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=2) + "\n")


def latest_tag(ckpt_root: str, must_exist: bool = True) -> Optional[str]:
    """The tag ``checkpoints/latest`` names, or None without a ``latest`` file. It must be a
    ``global_step<N>`` folder right inside ``ckpt_root`` (not a path, not a link out of the
    run): anything else is a :class:`CheckpointError`, as is a missing folder (unless
    ``must_exist=False``)."""
    path = os.path.join(ckpt_root, LATEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            tag = f.read(256).strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); it should hold one line "
                              f"'global_step<N>'.") from None
    if tag_step(tag) is None:
        raise CheckpointError(f"{path} names {tag[:80]!r}, not a global_step<N> folder of "
                              f"{ckpt_root}; refusing to follow it. Fix or delete the file.")
    folder = os.path.join(ckpt_root, tag)  # the pattern has no '/' or '..': stays inside
    if os.path.islink(folder):
        raise CheckpointError(f"{path} names {tag}, which is a link out of {ckpt_root}; "
                              f"refusing to follow it.")
    if not os.path.isdir(folder):
        if must_exist:
            raise CheckpointError(f"{path} names {tag} but {folder} does not exist; pass a "
                                  f"checkpoint folder explicitly or fix {path}.")
        return None
    return tag


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """``--checkpoint`` names no checkpoint (one line, exit 2)."""


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from a checkpoint folder, a checkpoints/ folder or a run dir."""
    if not path:
        raise CheckpointError("no checkpoint given (empty path); pass a run dir or a "
                              "checkpoint folder.")
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        tag = latest_tag(root)
        if tag is not None:
            return os.path.join(root, tag)
    raise CheckpointNotFound(
        f"'{path}' is neither a megaponder checkpoint (no {MODEL_FILE}) nor a run directory "
        f"with checkpoints/latest. Pass a run dir, runs/X/checkpoints/<tag>, or the --output of "
        f"tools/convert_checkpoint.py.")


def read_checkpoint_config(folder: str) -> Config:
    import yaml

    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged: {_first_line(err)}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} is damaged: not a mapping of config sections.")
    try:
        return config_from_dict(tree, check_paths=False)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({_first_line(err)}); the checkpoint cannot "
                              f"be trusted.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged: expected a JSON object.")
    return meta


def tokenizer_file(folder: str) -> Optional[str]:
    name = read_meta(folder).get("tokenizer")
    # only a file of the checkpoint folder itself: meta.json must not point anywhere else
    return os.path.join(folder, os.path.basename(str(name))) if name else None


def checkpoint_tokenizer_path(folder: str, override: Optional[str] = None) -> Optional[str]:
    """The tokenizer of a checkpoint: ``override``, else the copy inside the checkpoint, else
    the run's ``data.tokenizer_model``; None when that file does not exist."""
    path = override or tokenizer_file(folder) or read_checkpoint_config(folder).data.tokenizer_model
    return path if path and os.path.exists(path) else None


def load_model(path: str, map_location: str = "cpu"):
    """The model of a megaponder checkpoint (or run dir), on CPU, in eval mode."""
    from ..models import build_model

    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    model = build_model(cfg)
    state = safe_load(os.path.join(folder, MODEL_FILE), map_location, "model weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match a '{cfg.model.family}' model: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
