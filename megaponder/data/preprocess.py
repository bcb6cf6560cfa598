"""JSON-lines → MMIDIDX preprocessing (the engine behind ``tools/preprocess_data.py``).

Parallelism: a plain input file is cut into ``workers`` contiguous byte ranges on line
boundaries; each worker tokenizes its range and writes its own shard (the bigscience lesson:
workers that write shards themselves avoid funnelling every token through one process). The
shards are then concatenated in order with :meth:`IndexedDatasetBuilder.add_index`, so the result
is byte-identical to a single-worker run. Compressed inputs (.gz, .zst) are decompressed to a
temporary file first when ``workers > 1``.

Bad records never stop a run: each one is counted by reason, the first few are printed with
their 1-based line numbers, and all good records around them are kept. A record longer than
``max_record_bytes`` is one of them: lines are read with that limit and an oversized one is
skipped in pieces, so one huge record (a 200 MB line) costs at most the limit in memory instead
of the tens of times its size that JSON parsing and tokenizing it would.

One run at a time per output prefix: ``PREFIX.preprocess.lock`` (``fcntl.flock``, dropped by
the kernel however the holder exits) makes a second run on the same prefix stop at once with
one line, before it touches the first run's temporary folder.
"""
from __future__ import annotations

import errno
import fcntl
import gzip
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import MissingFileError, UserError
from .indexed import IndexedDatasetBuilder, best_token_dtype, get_bin_path, get_idx_path
from .tokenizer import build_tokenizer

ENCODE_BATCH = 128           # documents tokenized per encode_batch call
PROGRESS_EVERY_S = 0.2       # how often workers report progress
MAX_REPORTED_BAD = 20        # bad records printed with line numbers (all are counted)
MAX_KEPT_BAD = 1000          # bad records kept per worker for the summary object
ENCODE_BATCH_BYTES = 8 << 20  # ... or fewer, once their text reaches this many bytes
#: peak memory of parsing + tokenizing one record, per byte of record (measured on a 10 MB
#: English record: GPT-NeoX-20B's HF byte-level BPE 139x, the demo SentencePiece model 88x)
RECORD_MEMORY_FACTOR = 160
MIN_RECORD_LIMIT, MAX_RECORD_LIMIT = 1 << 20, 256 << 20


class PreprocessBusy(UserError):
    """Another preprocessing run writes the same output prefix."""


def default_max_record_bytes(workers: int) -> int:
    """The largest record worth tokenizing on this machine: a quarter of the physical memory,
    shared by the workers, over :data:`RECORD_MEMORY_FACTOR`; between 1 MiB and 256 MiB."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    limit = memory // 4 // max(1, workers) // RECORD_MEMORY_FACTOR
    return int(min(MAX_RECORD_LIMIT, max(MIN_RECORD_LIMIT, limit)))


def read_record(f, limit: int) -> tuple[Optional[bytes], int]:
    """The next line of ``f`` as (bytes, bytes consumed); (None, consumed) when it is longer than
    ``limit`` bytes (then it was skipped through in 1 MiB pieces, never held whole); (b"", 0)
    at the end of the file."""
    raw = f.readline(limit + 1)
    if raw.endswith(b"\n") or len(raw) <= limit:
        return raw, len(raw)
    consumed = len(raw)
    while True:
        piece = f.readline(1 << 20)
        consumed += len(piece)
        if not piece or piece.endswith(b"\n"):
            return None, consumed


@dataclass
class BadRecord:
    line: int                # 1-based line number in the input
    key: Optional[str]       # json key concerned (None: the whole record)
    reason: str


@dataclass
class ShardResult:
    docs: Counter = field(default_factory=Counter)     # per key
    tokens: Counter = field(default_factory=Counter)   # per key
    bad_counts: Counter = field(default_factory=Counter)  # per reason category
    bad: list = field(default_factory=list)             # first MAX_KEPT_BAD BadRecords
    lines: int = 0


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def open_input(path: str):
    """Binary file object for .jsonl, .jsonl.gz, or .jsonl.zst (if ``zstandard`` is installed)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise SystemExit(f"{path}: reading .zst needs the 'zstandard' package, which is not "
                             f"installed; decompress it first (zstd -d) or install zstandard.")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _rejected_reason(key: str, parts: list[str], err: Exception) -> str:
    """Why the tokenizer refused a record. A lone surrogate ("\\ud800" in the JSON) is valid JSON
    but not encodable text: SentencePiece raises TypeError, HF tokenizers a UnicodeEncodeError."""
    for part in parts:
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            return f"undecodable text: '{key}' holds an unpaired surrogate"
    return f"tokenizer error: '{key}' rejected ({type(err).__name__}: {' '.join(str(err).split())[:80]})"


def _category(reason: str) -> str:
    return reason.split(":", 1)[0]


def _parse_line(raw: bytes, keys: list[str]):
    """→ (dict key -> list[str] texts, list of (key, reason)) for one input line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return {}, [(None, f"undecodable bytes: not UTF-8 at byte {e.start}")]
    if not text.strip():
        return {}, [(None, "blank line")]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return {}, [(None, f"invalid JSON: {e.msg} at column {e.colno}")]
    if not isinstance(obj, dict):
        return {}, [(None, f"not a JSON object: got {type(obj).__name__}")]
    found, bad = {}, []
    for key in keys:
        if key not in obj:
            bad.append((key, f"missing key: '{key}' (record has {sorted(obj)[:5]})"))
            continue
        value = obj[key]
        # Megatron convention: a list of strings is a pre-split document (one sequence each)
        parts = value if isinstance(value, list) else [value]
        if not all(isinstance(p, str) for p in parts):
            bad.append((key, f"not a string: '{key}' holds {type(value).__name__}"))
            continue
        found[key] = parts
    return found, bad


class _Progress:
    """Throttled progress reporting: to a queue (worker process) or a tqdm bar (in-process)."""

    def __init__(self, sink):
        self.sink, self.lines, self.tokens, self.last = sink, 0, 0, time.monotonic()

    def add(self, lines: int, tokens: int, force: bool = False) -> None:
        self.lines += lines
        self.tokens += tokens
        now = time.monotonic()
        if self.sink is not None and (force or now - self.last >= PROGRESS_EVERY_S):
            self.sink(self.lines, self.tokens)
            self.lines = self.tokens = 0
            self.last = now


def process_range(path: str, start: int, end: Optional[int], first_line: int, keys: list[str],
                  tokenizer_type: str, tokenizer_model: str, out_prefix: str, append_eod: bool,
                  max_record_bytes: int, eod_token: Optional[str] = None,
                  progress_sink=None) -> ShardResult:
    """Tokenize lines in byte range [start, end) (end None: to EOF) into ``out_prefix``_<key>_document."""
    tok = build_tokenizer(tokenizer_type, tokenizer_model, eod_token)
    dtype = best_token_dtype(tok.vocab_size)
    builders = {k: IndexedDatasetBuilder(get_bin_path(output_prefix_for(out_prefix, k)), dtype)
                for k in keys}
    res = ShardResult()
    prog = _Progress(progress_sink)
    pending: list[tuple[int, str, list[str]]] = []  # (line, key, parts) awaiting tokenization

    def bad(line: int, key, reason: str) -> None:
        res.bad_counts[_category(reason)] += 1
        if len(res.bad) < MAX_KEPT_BAD:
            res.bad.append(BadRecord(line, key, reason))

    def flush() -> None:
        flat = [p for _, _, parts in pending for p in parts]
        try:
            encoded = tok.encode_batch(flat)
        except Exception:  # noqa: BLE001 — one record the tokenizer rejects: redo one by one to find it
            encoded = None
        pos, tokens_out = 0, 0
        for line, key, parts in pending:
            if encoded is not None:
                ids = encoded[pos:pos + len(parts)]
            else:
                try:
                    ids = [tok.encode(p) for p in parts]
                except Exception as e:  # noqa: BLE001 — skipped and counted, never fatal
                    ids = None
                    reason = _rejected_reason(key, parts, e)
            pos += len(parts)
            if ids is None:
                bad(line, key, reason)
                continue
            lengths = [len(x) for x in ids]
            if sum(lengths) == 0:
                bad(line, key, f"empty text: '{key}' has no tokens")
                continue
            if append_eod:
                ids[-1] = list(ids[-1]) + [tok.eod]
                lengths[-1] += 1
            flat_ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=sum(lengths))
            builders[key].add_document(flat_ids, lengths)
            res.docs[key] += 1
            res.tokens[key] += int(flat_ids.size)
            tokens_out += int(flat_ids.size)
        prog.add(0, tokens_out)
        pending.clear()

    with open_input(path) as f:
        if start:
            f.seek(start)
        pos, line_no, pending_bytes = start, first_line, 0
        while end is None or pos < end:
            raw, consumed = read_record(f, max_record_bytes)
            if not consumed:
                break
            pos += consumed
            line_no += 1
            res.lines += 1
            if raw is None:
                bad(line_no, None, f"record too large: {consumed:,} bytes > --max-record-bytes "
                                   f"{max_record_bytes:,}")
                prog.add(1, 0)
                continue
            found, problems = _parse_line(raw.rstrip(b"\r\n"), keys)
            for key, reason in problems:
                bad(line_no, key, reason)
            for key, parts in found.items():
                pending.append((line_no, key, parts))
            pending_bytes += len(raw)
            del raw
            prog.add(1, 0)
            if len(pending) >= ENCODE_BATCH or pending_bytes >= ENCODE_BATCH_BYTES:
                flush()
                pending_bytes = 0
        flush()
    prog.add(0, 0, force=True)
    for key, b in builders.items():
        b.finalize(get_idx_path(output_prefix_for(out_prefix, key)))
    return res


def split_byte_ranges(path: str, parts: int) -> list[tuple[int, Optional[int], int]]:
    """[(start, end, lines_before_start)] covering the file, cut just after newlines."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            target = max(cuts[-1], size * k // parts)
            f.seek(target)
            if target > 0:
                f.seek(target - 1)
                f.readline()  # move to the start of the next line
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    # line numbers at each cut (one pass over the file; counting bytes is far cheaper than tokenizing)
    lines_before, count = [], 0
    with open(path, "rb") as f:
        pos = 0
        for c in cuts[:-1]:
            while pos < c:
                chunk = f.read(min(16 << 20, c - pos))
                count += chunk.count(b"\n")
                pos += len(chunk)
            lines_before.append(count)
    ranges = [(cuts[i], cuts[i + 1], lines_before[i]) for i in range(parts)]
    return [r for r in ranges if r[1] > r[0]] or [(0, size, 0)]


def count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _worker_main(args, q) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF's thread pool is not fork-safe
    shard_id, kwargs = args

    def sink(lines, tokens):
        q.put(("progress", shard_id, lines, tokens))

    try:
        res = process_range(progress_sink=sink, **kwargs)
        q.put(("done", shard_id, res, None))
    except BaseException as e:  # report instead of hanging the parent
        q.put(("done", shard_id, None, f"{type(e).__name__}: {e}"))


class OutputPrefixLock:
    """``PREFIX.preprocess.lock``, held for a whole run (see the module docstring)."""

    def __init__(self, output_prefix: str):
        self.prefix, self.path = output_prefix, output_prefix + ".preprocess.lock"
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutputPrefixLock":
        while True:
            # O_NOFOLLOW: a planted link must not make the lock truncate the file it points to
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise UserError(f"{self.path} is a symbolic link; refusing to follow it. Remove "
                                f"it (megaponder never creates one).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 100).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise PreprocessBusy(
                    f"--output-prefix {self.prefix} is being written by another preprocessing "
                    f"run ({holder}, lock {self.path}); wait for it or choose another "
                    f"--output-prefix.") from None
            try:  # the holder unlinks the file on exit: a lock on an unlinked file is no lock
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.unlink(self.path)  # while still locked: see the inode check above
        os.close(self.fd)


def preprocess(input_path: str, json_keys: list[str], tokenizer_type: Optional[str],
               tokenizer_model: str, output_prefix: str, append_eod: bool = False,
               workers: int = 1, progress: bool = True, out=sys.stdout, err=sys.stderr,
               eod_token: Optional[str] = None, max_record_bytes: Optional[int] = None) -> dict:
    """Run the whole preprocessing; returns the summary dict that is also printed.
    ``max_record_bytes`` None: :func:`default_max_record_bytes`."""
    if not os.path.isfile(input_path):
        raise MissingFileError(f"--input {input_path} does not exist.")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with OutputPrefixLock(output_prefix):
        return _preprocess_locked(input_path, json_keys, tokenizer_type, tokenizer_model,
                                  output_prefix, append_eod, workers, progress, out, err,
                                  eod_token, max_record_bytes)


def _preprocess_locked(input_path, json_keys, tokenizer_type, tokenizer_model, output_prefix,
                       append_eod, workers, progress, out, err, eod_token, max_record_bytes) -> dict:
    from tqdm import tqdm

    json_keys = list(dict.fromkeys(json_keys))  # drop repeated keys, keep order
    tok = build_tokenizer(tokenizer_type, tokenizer_model, eod_token)  # fail fast on a bad model
    workers = max(1, int(workers))
    if max_record_bytes is None:
        max_record_bytes = default_max_record_bytes(workers)
    if max_record_bytes < 1:
        raise UserError(f"--max-record-bytes must be at least 1 (got {max_record_bytes}).")
    t0 = time.time()
    common = dict(keys=json_keys, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                  append_eod=append_eod, eod_token=eod_token, max_record_bytes=max_record_bytes)
    compressed = input_path.endswith((".gz", ".zst"))
    # Everything is written under tmp_dir (same file system as the outputs) and renamed into
    # place only at the end: an interrupted or failed run never touches previous outputs.
    tmp_dir = output_prefix + ".preprocess-tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run
    os.makedirs(tmp_dir)
    staged = os.path.join(tmp_dir, "out")
    source = input_path
    if compressed and workers > 1:
        source = os.path.join(tmp_dir, "input.jsonl")
        print(f"decompressing {input_path} to {source} for {workers} workers", file=err)
        with open_input(input_path) as src, open(source, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    total_lines = None if (compressed and workers == 1) else count_lines(source)
    bar = tqdm(total=total_lines, unit="doc", file=err, disable=not progress, dynamic_ncols=True,
               desc="preprocess", mininterval=0.5)
    tokens_seen = 0

    def on_progress(lines: int, tokens: int) -> None:
        nonlocal tokens_seen
        tokens_seen += tokens
        bar.update(lines)
        elapsed = max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{tokens_seen / elapsed:,.0f} tok/s", refresh=False)

    try:
        try:
            ranges = split_byte_ranges(source, workers) if workers > 1 else [(0, None, 0)]
            if len(ranges) == 1:
                results = [process_range(source, ranges[0][0], ranges[0][1], ranges[0][2],
                                         out_prefix=staged, progress_sink=on_progress, **common)]
            else:
                results = _run_workers(source, ranges, staged, tmp_dir, common, on_progress)
        finally:
            bar.close()
        elapsed = time.time() - t0
        summary = _summarize(results, json_keys, output_prefix, elapsed, tok, append_eod, input_path)
        summary["max_record_bytes"] = max_record_bytes
        summary["written"] = _publish(staged, output_prefix, json_keys, summary, tok, append_eod)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _print_summary(summary, results, out, err)
    return summary


def _publish(staged: str, output_prefix: str, keys: list[str], summary: dict, tok,
             append_eod: bool) -> list[str]:
    """Move each key's finished files into place; a key without documents keeps whatever was
    there before (an empty .bin/.idx would only fail later, at train time)."""
    from .checks import meta_path, write_meta

    written = []
    for key in keys:
        if summary["documents"][key] == 0:
            continue
        src, dst = output_prefix_for(staged, key), output_prefix_for(output_prefix, key)
        write_meta(src, tok, append_eod)
        if os.path.exists(meta_path(dst)):
            os.remove(meta_path(dst))  # never leave a sidecar describing the old files
        for path in (get_bin_path, get_idx_path, meta_path):
            os.replace(path(src), path(dst))
        written.append(dst)
    return written


def _run_workers(source, ranges, output_prefix, tmp_dir, common, on_progress) -> list[ShardResult]:
    os.makedirs(tmp_dir, exist_ok=True)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    q = ctx.Queue()
    shard_prefixes = [os.path.join(tmp_dir, f"shard{i:04d}") for i in range(len(ranges))]
    procs = []
    for i, (start, end, first_line) in enumerate(ranges):
        kwargs = dict(path=source, start=start, end=end, first_line=first_line,
                      out_prefix=shard_prefixes[i], **common)
        p = ctx.Process(target=_worker_main, args=((i, kwargs), q), daemon=True)
        p.start()
        procs.append(p)
    results: list[Optional[ShardResult]] = [None] * len(ranges)
    errors, done = [], 0
    while done < len(ranges):
        try:
            msg = q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"a preprocessing worker died (exit code {dead[0].exitcode}); "
                                   f"try --workers 1 to see the error.")
            continue
        if msg[0] == "progress":
            on_progress(msg[2], msg[3])
        else:
            done += 1
            if msg[3] is not None:
                errors.append(f"shard {msg[1]}: {msg[3]}")
            results[msg[1]] = msg[2]
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError("preprocessing failed: " + "; ".join(errors))
    # concatenate shards in input order; doc_idx is shifted by add_index
    for key in common["keys"]:
        final = output_prefix_for(output_prefix, key)
        dtype = None
        builder = None
        for sp in shard_prefixes:
            from .indexed import IndexedDataset
            part = output_prefix_for(sp, key)
            if builder is None:
                dtype = IndexedDataset(part).dtype
                builder = IndexedDatasetBuilder(get_bin_path(final), dtype)
            builder.add_index(part)
        builder.finalize(get_idx_path(final))
    return results  # type: ignore[return-value]


def _summarize(results, keys, output_prefix, elapsed, tok, append_eod, input_path) -> dict:
    docs, tokens, bad_counts = Counter(), Counter(), Counter()
    bad: list[BadRecord] = []
    lines = 0
    for r in results:
        docs.update(r.docs)
        tokens.update(r.tokens)
        bad_counts.update(r.bad_counts)
        bad.extend(r.bad)
        lines += r.lines
    bad.sort(key=lambda b: b.line)
    return {
        "input": input_path,
        "lines": lines,
        "documents": {k: docs[k] for k in keys},
        "tokens": {k: tokens[k] for k in keys},
        "bad_records": sum(bad_counts.values()),
        "bad_by_reason": dict(sorted(bad_counts.items())),
        "bad_examples": [{"line": b.line, "key": b.key, "reason": b.reason} for b in bad],
        "outputs": {k: output_prefix_for(output_prefix, k) for k in keys},
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(best_token_dtype(tok.vocab_size)).name,
        "append_eod": append_eod,
        "eod": tok.eod,
        "eod_token": tok.token_name(tok.eod),
        "seconds": round(elapsed, 3),
        "docs_per_s": round(sum(docs.values()) / max(elapsed, 1e-9), 1),
        "tokens_per_s": round(sum(tokens.values()) / max(elapsed, 1e-9), 1),
    }


def _print_summary(s: dict, results, out, err) -> None:
    if s["bad_records"]:
        print(f"skipped {s['bad_records']} bad record(s):", file=err)
        for b in s["bad_examples"][:MAX_REPORTED_BAD]:
            where = f" [{b['key']}]" if b["key"] else ""
            print(f"  line {b['line']}{where}: {b['reason']}", file=err)
        if s["bad_records"] > MAX_REPORTED_BAD:
            print(f"  ... and {s['bad_records'] - MAX_REPORTED_BAD} more", file=err)
    print(f"preprocess summary: {s['lines']} lines in {s['seconds']:.2f}s "
          f"({s['docs_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s)", file=out)
    for key, prefix in s["outputs"].items():
        if s["documents"][key] == 0:
            print(f"  {key}: no documents (every record was bad); nothing written, "
                  f"{prefix}.bin/.idx left as they were", file=out)
            continue
        print(f"  {key}: {s['documents'][key]} documents, {s['tokens'][key]} tokens "
              f"({s['dtype']}) -> {prefix}.bin/.idx (+ .meta.json)", file=out)
    reasons = ", ".join(f"{k}: {v}" for k, v in s["bad_by_reason"].items()) or "none"
    print(f"  bad records skipped: {s['bad_records']} ({reasons})", file=out)
