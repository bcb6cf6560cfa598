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

Links are never followed inside a run: ``checkpoints/`` and every ``global_step<N>`` tag must
be real folders (not symlinks), no file or folder inside a tag may be a link, and the ``step``
in a tag's meta.json must be the step in its name; anything else is refused in one line
(:class:`UnsafeCheckpoint`), never a reason to fall back quietly. Every file is written
through megaponder/safe_files.py (temp name created exclusively, renamed into place), so a
planted link is replaced, never written through. A folder the user names explicitly
(``--checkpoint DIR``, ``load_model(DIR)``) may itself be a link: that is the user's choice.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import stat
from typing import Any, Optional

import numpy as np
import torch

from ..config import Config, ConfigError, config_from_dict
from ..data.tokenizer import copy_tokenizer
from ..safe_files import atomic_write, fsync_dir, remove_tree, write_atomic

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


def fsync_tree(root: str) -> None:
    """fsync every file and folder below ``root`` (before a checkpoint is published, so a
    power loss cannot leave ``latest`` naming a folder whose data never reached the disk)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def _write_atomic(path: str, text: str) -> None:
    """Durably replace ``path`` by ``text`` (never through a link: safe_files.write_atomic)."""
    write_atomic(path, text, fsync=True)


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)[:120]
    except OSError:
        return "?"


def real_subfolder(path: str, what: str = "checkpoint folder") -> bool:
    """Whether ``path`` (a name megaponder owns inside a run: ``checkpoints/``, a tag, a
    staging folder) exists as a real folder; a link or a non-folder is a one-line
    :class:`UnsafeCheckpoint`, whatever it points to."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise UnsafeCheckpoint(f"{what} {path} is a link out of the run (to {_link_target(path)}); "
                               f"megaponder reads and writes checkpoints only in real folders inside "
                               f"the run. Replace the link by the folder itself, or pass the "
                               f"checkpoint folder explicitly.")
    if not stat.S_ISDIR(mode):
        raise UnsafeCheckpoint(f"{what} {path} is not a folder; remove it and run again.")
    return True


def check_tag_folder(folder: str, named_by_user: bool = False) -> None:
    """A checkpoint folder read for resume or loading: a real folder (unless the user named
    it: then it may be a link, their choice), no link inside, and, for a ``global_step<N>``
    folder, meta.json's step equal to N (a copied or renamed tag would resume at the wrong
    step and data position). :class:`UnsafeCheckpoint` in one line otherwise."""
    if not named_by_user:
        real_subfolder(folder)
    for inner, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(inner, name)
            if os.path.islink(path):
                raise UnsafeCheckpoint(f"{path} is a link (to {_link_target(path)}); a checkpoint "
                                       f"holds only real files, refusing to load it. Replace the "
                                       f"link by the file itself.")
    named = tag_step(os.path.basename(os.path.normpath(folder)))
    saved = read_meta(folder).get("step")
    if named is not None and saved is not None and saved != named:
        raise UnsafeCheckpoint(f"{os.path.join(folder, META_FILE)} says step {str(saved)[:40]} but the "
                               f"folder is named global_step{named}; a renamed or copied checkpoint "
                               f"would resume at the wrong step. Rename the folder to "
                               f"global_step<its step> or remove it.")


def safe_load(path: str, map_location: Any = "cpu", what: str = "checkpoint file",
              allow: tuple = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file: refuses pickled
    code (anything but tensors, plain containers/numbers/strings and the ``allow`` classes)
    and damaged files."""
    if os.path.islink(path):
        raise UnsafeCheckpoint(f"{what} {path} is a link (to {_link_target(path)}); a checkpoint "
                               f"holds only real files, refusing to load it.")
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
    if os.path.lexists(aside):  # left by an earlier crash after `final` was back in place
        remove_tree(aside)
    if os.path.lexists(final):
        os.replace(final, aside)
        fsync_dir(ckpt_root)
        _fault_kill("aside")
    os.replace(stage, final)
    fsync_dir(ckpt_root)
    _write_atomic(os.path.join(ckpt_root, LATEST_FILE), tag + "\n")
    if os.path.lexists(aside):
        remove_tree(aside)
    return final


def make_staging_dir(ckpt_root: str, tag: str) -> str:
    """Rank 0 before a save: a new, empty, real ``.tmp-<tag>/rng`` (whatever was under that
    name, a link included, is removed first, so every rank writes into a folder this job made)."""
    real_subfolder(ckpt_root, "checkpoints folder")
    stage = staging_dir(ckpt_root, tag)
    if os.path.lexists(stage):
        remove_tree(stage)
    os.mkdir(stage)
    os.mkdir(os.path.join(stage, "rng"))
    return stage


def recover(ckpt_root: str) -> list[str]:
    """Undo what a kill inside :func:`publish` or a save left behind (rank 0, holding the
    run-dir lock): an ``.old-<tag>`` whose ``<tag>`` is missing goes back in place, one whose
    ``<tag>`` was published is deleted, staging folders are deleted. Returns what it did."""
    done = []
    if not real_subfolder(ckpt_root, "checkpoints folder"):
        return done
    for name in sorted(os.listdir(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        if name.startswith((".old-", ".tmp-")) and os.path.islink(path):
            os.unlink(path)  # never ours: a link is not put in place nor followed
            done.append(f"deleted the link {name} (megaponder never makes links there)")
        elif name.startswith(".old-"):
            final = os.path.join(ckpt_root, name[len(".old-"):])
            if os.path.lexists(final):
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
    if not real_subfolder(ckpt_root, "checkpoints folder"):
        return []
    tags = [t for t in os.listdir(ckpt_root) if tag_step(t) is not None]
    for tag in tags:  # a link among the tags is refused, not skipped: someone planted it
        real_subfolder(os.path.join(ckpt_root, tag))
    tags = [t for t in tags if os.path.isfile(os.path.join(ckpt_root, t, META_FILE))]
    return sorted(tags, key=tag_step, reverse=True)


def prune(ckpt_root: str, keep_last: int) -> list[str]:
    """Retention: keep the ``keep_last`` newest complete checkpoints (0 keeps all) and never
    the one ``latest`` names. Returns the deleted tags."""
    if keep_last <= 0:
        return []
    latest = latest_tag(ckpt_root)
    gone = [t for t in complete_tags(ckpt_root)[keep_last:] if t != latest]
    for tag in gone:
        remove_tree(os.path.join(ckpt_root, tag))
    return gone


def verify_checkpoint(folder: str, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """What is wrong with checkpoint ``folder`` for resuming on ``rank`` of ``world_size``, or
    None. No collectives: rank r fully reads (``weights_only``) every world_size-th file, so
    the ranks together read the checkpoint once; the caller combines the verdicts. An unsafe
    file is reported with the prefix :data:`UNSAFE` (the caller stops instead of falling back)."""
    try:
        check_tag_folder(folder)
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
        with atomic_write(os.path.join(folder, MODEL_FILE)) as f:
            torch.save(state_dict, f)
    _write_atomic(os.path.join(folder, CONFIG_FILE), cfg.to_yaml())
    if tokenizer_path and os.path.exists(tokenizer_path):
        # a folder or GPT-2 pair becomes one file; written without following links
        meta = {**meta, "tokenizer": copy_tokenizer(tokenizer_path, folder)}
    _write_atomic(os.path.join(folder, META_FILE), json.dumps(meta, indent=2) + "\n")


def latest_tag(ckpt_root: str, must_exist: bool = True) -> Optional[str]:
    """The tag ``checkpoints/latest`` names, or None without a ``latest`` file. It must be a
    ``global_step<N>`` folder right inside ``ckpt_root`` (not a path, not a link out of the
    run): anything else is a :class:`CheckpointError`, as is a missing folder (unless
    ``must_exist=False``)."""
    path = os.path.join(ckpt_root, LATEST_FILE)
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a link (to {_link_target(path)}); megaponder writes it "
                              f"as a file, refusing to follow it. Delete it (training rewrites it).")
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
    if not real_subfolder(folder):
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
        check_tag_folder(path, named_by_user=True)
        return path
    runs_root = os.path.join(path, "checkpoints")
    for root in (runs_root, path):
        if root == runs_root:
            real_subfolder(root, "checkpoints folder")
        tag = latest_tag(root)
        if tag is not None:
            check_tag_folder(os.path.join(root, tag))
            return os.path.join(root, tag)
    raise CheckpointNotFound(
        f"'{path}' is neither a megaponder checkpoint (no {MODEL_FILE}) nor a run directory "
        f"with checkpoints/latest. Pass a run dir, runs/X/checkpoints/<tag>, or the --output of "
        f"tools/convert_checkpoint.py.")


def read_checkpoint_config(folder: str) -> Config:
    from ..config.yaml_io import load_yaml_file

    path = os.path.join(folder, CONFIG_FILE)
    if os.path.islink(path):
        raise UnsafeCheckpoint(f"{path} is a link (to {_link_target(path)}); a checkpoint holds only "
                               f"real files, refusing to load it.")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete.")
    try:  # the config reader's limits: an alias bomb or a huge file fails in one line
        tree = load_yaml_file(path)
    except ConfigError as err:
        raise CheckpointError(f"{CONFIG_FILE} is damaged: {err}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} is damaged: not a mapping of config sections.")
    try:
        return config_from_dict(tree, check_paths=False)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    if os.path.islink(path):
        raise UnsafeCheckpoint(f"{path} is a link (to {_link_target(path)}); a checkpoint holds only "
                               f"real files, refusing to load it.")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.loads(f.read(1 << 20))  # a meta.json is a few hundred bytes
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


def deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files (ZeRO optimizer
    states: the loss scaler, the stage enum; bf16: fragment addresses). Found by
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32 and bf16 states."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True``, whatever its call site
    asks for: DeepSpeed's checkpoint engine passes ``weights_only=False``, which would run any
    code pickled into a shared run dir. TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides an explicit
    argument (torch.serialization), and the allow-list admits DeepSpeed's own classes. A
    refused or damaged file becomes a CheckpointError naming it."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"a DeepSpeed state file holds pickled objects other than tensors "
                              f"and DeepSpeed's own classes; refusing to load it (it could run "
                              f"code): {_first_line(err)}") from None
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
