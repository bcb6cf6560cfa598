"""Checks that the data fits the model and tokenizer, run once at train start.

The MMIDIDX ``.idx`` records neither the tokenizer nor the largest token id, so these mistakes
used to surface as a raw ``IndexError`` at step 0 or, worse, train silently:

- token ids at or beyond ``model.vocab_size`` (data made for a larger vocabulary);
- ``model.vocab_size`` smaller than the tokenizer's vocabulary;
- data made with another tokenizer than ``data.tokenizer_model``;
- negative ids, i.e. a signed dtype code (int16) over data written as unsigned (uint16).

``tools/preprocess_data.py`` therefore writes a sidecar ``PREFIX.meta.json`` next to
``PREFIX.bin``/``.idx`` holding the tokenizer's fingerprint (sha256 of its vocabulary), its
vocabulary size and the min/max token id. When the sidecar is there (and describes these
files: same .bin and .idx sizes) the checks read it; otherwise the ``.bin`` is scanned with numpy —
all of it up to :data:`FULL_SCAN_BYTES`, beyond that :data:`SAMPLE_WINDOWS` evenly spaced
windows (a bounded sample, which can miss a rare bad id; the log line says which was done).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from ..safe_files import write_atomic
from .indexed import IndexedDataset, get_bin_path, get_idx_path

META_SUFFIX = ".meta.json"
META_FORMAT = "megaponder-dataset-meta"
FULL_SCAN_BYTES = 4 << 30      # scan every token up to 4 GiB of .bin (~1 GiB/s on a loaded 2-core machine)
SAMPLE_WINDOWS = 256           # beyond that: this many windows of SAMPLE_WINDOW_BYTES
SAMPLE_WINDOW_BYTES = 4 << 20


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def write_meta(prefix: str, tokenizer, append_eod: bool) -> dict:
    """Write ``PREFIX.meta.json`` for a finished ``PREFIX.bin``/``.idx`` (called by preprocess)."""
    ds = IndexedDataset(prefix)
    lo, hi = token_range(ds, full_scan_bytes=1 << 62)  # exact: a scan costs little next to tokenizing
    meta = {
        "format": META_FORMAT, "version": 1,
        "tokenizer": {"type": type(tokenizer).__name__, "model": os.path.abspath(tokenizer.path),
                      "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "eod": tokenizer.eod, "eod_token": tokenizer.token_name(tokenizer.eod)},
        "append_eod": bool(append_eod),
        "sequences": len(ds), "documents": ds.num_documents, "tokens": ds.num_tokens,
        "min_token_id": lo, "max_token_id": hi, "dtype": ds.dtype.name,
    }
    return _save_meta(prefix, meta)


def write_merged_meta(inputs: list[str], prefix: str) -> Optional[dict]:
    """Sidecar of ``prefix``, the concatenation of ``inputs`` (tools/merge_datasets.py): written
    when every input has one and all name the same tokenizer, else none (the train-start checks
    then scan the data). Any old sidecar at ``prefix`` is removed either way."""
    if os.path.exists(meta_path(prefix)):
        os.remove(meta_path(prefix))
    metas = [read_meta(p) for p in inputs]
    if not metas or any(m is None for m in metas) or \
            len({m["tokenizer"]["fingerprint"] for m in metas}) != 1:
        return None
    ds = IndexedDataset(prefix)
    nonempty = [m for m in metas if m["max_token_id"] >= 0]
    meta = dict(metas[0], sequences=len(ds), documents=ds.num_documents, tokens=ds.num_tokens,
                min_token_id=min((m["min_token_id"] for m in nonempty), default=0),
                max_token_id=max((m["max_token_id"] for m in nonempty), default=-1),
                append_eod=all(m.get("append_eod") for m in metas), dtype=ds.dtype.name)
    return _save_meta(prefix, meta)


def _file_sizes(prefix: str) -> tuple[int, int]:
    """(.bin bytes, .idx bytes): what ties a sidecar to the files it describes."""
    return os.path.getsize(get_bin_path(prefix)), os.path.getsize(get_idx_path(prefix))


def _save_meta(prefix: str, meta: dict) -> dict:
    """Stamp ``meta`` with the files' sizes and write it atomically (no half-written sidecar)."""
    meta["bin_bytes"], meta["idx_bytes"] = _file_sizes(prefix)
    write_atomic(meta_path(prefix), json.dumps(meta, indent=1))  # never through a planted link
    return meta


def read_meta(prefix: str) -> Optional[dict]:
    """The sidecar if it exists, is readable and describes this ``.bin``; else None."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e}); delete it (the checks then "
                        f"scan the data) or re-run tools/preprocess_data.py.") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return None
    if (meta.get("bin_bytes"), meta.get("idx_bytes")) != _file_sizes(prefix):
        return None  # the files were rewritten by another tool: the sidecar no longer applies
    return meta


def token_range(ds: IndexedDataset, full_scan_bytes: int = FULL_SCAN_BYTES) -> tuple[int, int]:
    """(min, max) token id of the whole ``.bin``; (0, -1) when it holds no tokens."""
    tokens = ds.all_tokens()
    if tokens.size == 0:
        return 0, -1
    if tokens.nbytes <= full_scan_bytes:
        return _chunked_minmax(tokens)
    return sampled_token_range(ds)


def sampled_token_range(ds: IndexedDataset) -> tuple[int, int]:
    tokens = ds.all_tokens()
    window = max(1, SAMPLE_WINDOW_BYTES // tokens.itemsize)
    starts = np.linspace(0, max(0, tokens.size - window), SAMPLE_WINDOWS).astype(np.int64)
    lo, hi = None, None
    for s in np.unique(starts):
        a, b = _chunked_minmax(tokens[s:s + window])
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return int(lo), int(hi)


def _chunked_minmax(tokens: np.ndarray, chunk: int = 64 << 20) -> tuple[int, int]:
    lo, hi = None, None
    for s in range(0, tokens.size, chunk):
        part = tokens[s:s + chunk]
        a, b = int(part.min()), int(part.max())
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return lo, hi


def open_datasets(data_cfg) -> dict[str, IndexedDataset]:
    """Every dataset of ``data.path`` and ``data.valid_path``, opened (and its ``.idx``/``.bin``
    validated) once, by prefix: what the checks, the training samples and the validation
    batches then share."""
    from ..config import _data_prefixes

    prefixes = _data_prefixes(data_cfg.path) + _data_prefixes(data_cfg.valid_path)
    return {str(prefix): IndexedDataset(str(prefix)) for prefix in dict.fromkeys(prefixes)}


def file_sizes(datasets: dict[str, IndexedDataset]) -> dict[str, tuple[int, int]]:
    """(.bin bytes, .idx bytes) of each dataset: how ranks tell that they see the same files
    without reading them."""
    return {prefix: _file_sizes(prefix) for prefix in datasets}


def same_files_problem(mine: dict, reference: dict, rank: int) -> Optional[str]:
    """Why this rank's files differ from rank 0's (``file_sizes`` of each), or None: a
    node-local copy that is not the one rank 0 checked."""
    for prefix, sizes in mine.items():
        theirs = reference.get(prefix)
        if sizes != theirs:
            return (f"{prefix}.bin/.idx (bytes) are {sizes} on rank {rank} but {theirs} on "
                    f"rank 0, which checked them: another copy on this node? Give every node "
                    f"the same files.")
    return None


def open_and_check_data(cfg, log: Callable[[str], None] = lambda m: None
                        ) -> dict[str, IndexedDataset]:
    """The datasets of ``cfg`` (:func:`open_datasets`), checked, for a training job.

    Every rank opens (and so validates the ``.idx``/``.bin`` of) each dataset once; rank 0
    alone runs :func:`check_data_fits`, which may scan the tokens: once per job, because the
    files normally live on a shared file system, where a scan per rank or per node would read
    the same bytes again. The other ranks compare their files' sizes with rank 0's (a stat,
    no read), so a node-local copy that differs from the one rank 0 checked is refused. Each
    step ends with the ranks agreeing (megaponder.collectives): a failure on any rank
    stops all of them with its message. Without torch.distributed: open, then check."""
    import torch.distributed as dist

    from ..collectives import agree_on_failure, multi_process

    distributed = multi_process()
    rank = dist.get_rank() if distributed else 0
    with agree_on_failure("opening the data"):
        datasets = open_datasets(cfg.data)
        sizes = file_sizes(datasets)
    reference = [sizes]
    if distributed:
        dist.broadcast_object_list(reference, src=0)
    with agree_on_failure("data checks"):
        if rank == 0:
            check_data_fits(cfg, log, datasets)
        elif (problem := same_files_problem(sizes, reference[0], rank)) is not None:
            raise DataError(problem)
    return datasets


def data_tokenizer(data_cfg):
    """The tokenizer of a ``data:`` section. Its end of document: ``data.eod_token``, else
    the token the first dataset's ``.meta.json`` says preprocessing appended (so packing
    resets where the documents really end), else the tokenizer's own guess."""
    from ..config import _data_prefixes
    from .tokenizer import build_tokenizer

    if data_cfg.eod_token is None:
        for prefix in _data_prefixes(data_cfg.path) + _data_prefixes(data_cfg.valid_path):
            try:
                made_with = (read_meta(str(prefix)) or {}).get("tokenizer", {})
            except (DataError, OSError):
                made_with = {}  # the data checks report a damaged sidecar with its file name
            if made_with.get("eod_token"):
                try:
                    tok = build_tokenizer(data_cfg.tokenizer_type, data_cfg.tokenizer_model,
                                          made_with["eod_token"])
                except DataError:
                    break  # another tokenizer: the data checks say so
                if tok.fingerprint == made_with.get("fingerprint"):
                    return tok
            break
    return build_tokenizer(data_cfg.tokenizer_type, data_cfg.tokenizer_model, data_cfg.eod_token)


def check_data_fits(cfg, log: Callable[[str], None] = lambda m: None,
                    datasets: Optional[dict[str, IndexedDataset]] = None) -> None:
    """Raise :class:`DataError` (one line naming the file or key) if the data of ``cfg`` cannot
    train ``cfg.model`` with ``cfg.data``'s tokenizer. ``datasets``: from :func:`open_datasets`
    (opened here otherwise). The trainer runs this on rank 0 only."""
    vocab = cfg.model.vocab_size
    tok = None
    if cfg.data.tokenizer_model:
        tok = data_tokenizer(cfg.data)
        if tok.vocab_size > vocab:
            raise DataError(f"model.vocab_size={vocab} is smaller than the vocabulary of "
                            f"data.tokenizer_model {cfg.data.tokenizer_model} ({tok.vocab_size} "
                            f"tokens); set model.vocab_size={tok.vocab_size}.")
    for prefix, ds in (datasets if datasets is not None else open_datasets(cfg.data)).items():
        if len(ds) == 0 or ds.num_tokens == 0:
            raise DataError(f"{prefix}.bin/.idx hold no tokens (an empty dataset: did "
                            f"preprocessing skip every record?); rebuild it or remove it from "
                            f"data.path/data.valid_path.")
        meta = read_meta(prefix)
        if meta is not None:
            lo, hi, how = meta["min_token_id"], meta["max_token_id"], meta_path(prefix)
            made_with = meta.get("tokenizer", {})
            if tok is not None and made_with.get("fingerprint") not in (None, tok.fingerprint):
                raise DataError(
                    f"{prefix}.bin was made with another tokenizer ({made_with.get('model')}, "
                    f"{made_with.get('vocab_size')} tokens, per {meta_path(prefix)}) than "
                    f"data.tokenizer_model {cfg.data.tokenizer_model} ({tok.vocab_size} tokens); "
                    f"point data.tokenizer_model at the one the data was made with, or "
                    f"re-run tools/preprocess_data.py with this one.")
        else:
            full = ds.all_tokens().nbytes <= FULL_SCAN_BYTES
            lo, hi = token_range(ds)
            how = ("a scan of every token" if full else
                   f"a sample of {SAMPLE_WINDOWS} windows (no {os.path.basename(meta_path(prefix))})")
        if lo < 0:
            raise DataError(f"{prefix}.bin holds negative token id {lo} (found by {how}); its "
                            f".idx dtype code says {ds.dtype.name} — a signed dtype over data "
                            f"written unsigned? Rebuild the .idx with the right dtype code.")
        if hi >= vocab:
            raise DataError(f"{prefix}.bin holds token id {hi} (found by {how}), but "
                            f"model.vocab_size={vocab}; set model.vocab_size to at least {hi + 1} "
                            f"(the tokenizer's vocabulary size) or use data made with this "
                            f"model's tokenizer.")
        log(f"data {prefix}: {ds.num_tokens:,} tokens, ids {lo}..{hi} < vocab {vocab} (checked by {how})")
