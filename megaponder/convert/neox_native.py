"""GPT-NeoX native training checkpoints -> megaponder backbone tensors.

A GPT-NeoX run (DeepSpeed ``PipelineModule``) saves ``global_stepN/`` with one file per
pipeline layer and model-parallel (tensor-parallel) rank::

    layer_00-model_YY-model_states.pt       EmbeddingPipe: word_embeddings.weight [V/tp, d]
    layer_01                                 _pre_transformer_block (a function: no file)
    layer_02 .. layer_{L+1}                  transformer layers 0 .. L-1
    layer_{L+2}                              _post_transformer_block (no file)
    layer_{L+3}-model_YY-model_states.pt    NormPipe: norm.weight / norm.bias
    layer_{L+4}-model_YY-model_states.pt    ParallelLinearPipe: final_linear.weight [V/tp, d]
                                             (only with no-weight-tying; else the head is the
                                             embedding, layer_00)

``YY`` is the tensor-parallel rank; the pipeline degree does not appear in the names. A run
with ``pipe-parallel-size: 0`` (plain sequential model) saves ``mp_rank_YY_model_states.pt``
with every tensor under ``module`` as ``sequential.<layer index>.<name>`` instead. Both are
read here. How the tensor-parallel shards merge (as in GPT-NeoX's own
tools/ckpts/convert_neox_to_hf.py, with megatron/model/transformer.py for the reasons):

* ``query_key_value`` (column-parallel): rows concatenated. Each rank holds whole heads with
  GPT-NeoX's per-head [q|k|v] row interleave, which is megaponder's (and Hugging Face's)
  layout, so rank blocks line up.
* ``dense_h_to_4h`` / ``linear1`` (column-parallel): rows concatenated; ``dense`` and
  ``dense_4h_to_h`` / ``linear2`` (row-parallel): columns concatenated.
* Row-parallel biases: with ``gpt-j-residual`` (parallel residual, Pythia) every rank adds its
  own bias before the one all-reduce of attention+MLP output, so the model's bias is the *sum*
  over ranks. Without it the row-parallel layer all-reduces first and adds one replicated bias:
  the ranks hold the same tensor, and it is taken once.
* LayerNorms (replicated): averaged, as GPT-NeoX's converter does (they are identical).
* Embedding and head: vocabulary rows concatenated (padded vocabulary).
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional

import torch

from ..config import ModelConfig
from ..config.yaml_io import load_yaml_file
from ..errors import UserError

# GPT-NeoX name (legacy, as in Pythia's files / newer) -> megaponder name suffix, and merge rule
_LAYER_TENSORS = [
    # (neox names, megaponder name, merge)
    (("input_layernorm.weight",), "ln_attn.weight", "mean"),
    (("input_layernorm.bias",), "ln_attn.bias", "mean"),
    (("post_attention_layernorm.weight",), "ln_mlp.weight", "mean"),
    (("post_attention_layernorm.bias",), "ln_mlp.bias", "mean"),
    (("attention.query_key_value.weight",), "attn.qkv.weight", "rows"),
    (("attention.query_key_value.bias",), "attn.qkv.bias", "rows"),
    (("attention.dense.weight",), "attn.out.weight", "cols"),
    (("attention.dense.bias",), "attn.out.bias", "row_parallel_bias"),
    (("mlp.dense_h_to_4h.weight", "mlp.linear1.weight"), "mlp.fc1.weight", "rows"),
    (("mlp.dense_h_to_4h.bias", "mlp.linear1.bias"), "mlp.fc1.bias", "rows"),
    (("mlp.dense_4h_to_h.weight", "mlp.linear2.weight"), "mlp.fc2.weight", "cols"),
    (("mlp.dense_4h_to_h.bias", "mlp.linear2.bias"), "mlp.fc2.bias", "row_parallel_bias"),
]
# buffers GPT-NeoX keeps in layer files that carry no learned state
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.(bias|masked_bias)|_extra_state)$")


class NeoXCheckpointError(UserError, ValueError):
    """A GPT-NeoX checkpoint folder or config megaponder cannot read; the message says why."""


def neox_key(neox_cfg: dict, key: str, default=None):
    """A GPT-NeoX config value; GPT-NeoX accepts ``-`` and ``_`` spellings alike."""
    for k in (key.replace("_", "-"), key.replace("-", "_")):
        if k in neox_cfg:
            return neox_cfg[k]
    return default


def read_neox_config(paths) -> dict:
    """One dict from a GPT-NeoX config YAML (or several, merged in order, as deepy.py does)."""
    merged: dict = {}
    for path in [paths] if isinstance(paths, str) else paths:
        if not os.path.isfile(path):
            raise NeoXCheckpointError(f"GPT-NeoX config '{path}' does not exist (pass the run's "
                                      f"YAML with --config).")
        tree = load_yaml_file(path) or {}  # megaponder's reader: alias bombs fail in one line
        if not isinstance(tree, dict):
            raise NeoXCheckpointError(f"{path}: a GPT-NeoX config is a mapping of keys")
        merged.update(tree)
    return merged


def model_config_from_neox(neox_cfg: dict, padded_vocab: int) -> ModelConfig:
    """The megaponder backbone of a GPT-NeoX model config; refuses what megaponder's GPT-NeoX
    backbone does not compute (so a converted model is never silently different)."""
    def need(cond, msg):
        if not cond:
            raise NeoXCheckpointError(f"GPT-NeoX config: {msg}")

    for key in ("num-layers", "hidden-size", "num-attention-heads"):
        need(neox_key(neox_cfg, key) is not None, f"'{key}' is missing")
    need(neox_key(neox_cfg, "pos-emb", "learned") == "rotary",
         f"pos-emb={neox_key(neox_cfg, 'pos-emb', 'learned')!r}; only rotary (Pythia) is supported")
    need(neox_key(neox_cfg, "norm", "layernorm") == "layernorm",
         f"norm={neox_key(neox_cfg, 'norm')!r}; only layernorm (Pythia) is supported")
    need(neox_key(neox_cfg, "activation", "gelu") == "gelu",
         f"activation={neox_key(neox_cfg, 'activation')!r}; only gelu (Pythia) is supported")
    need(not neox_key(neox_cfg, "gpt-j-tied", False),
         "gpt-j-tied=true (one LayerNorm shared by attention and MLP) is not supported")
    need(neox_key(neox_cfg, "num-kv-heads") in (None, neox_key(neox_cfg, "num-attention-heads")),
         "grouped-query attention (num-kv-heads) is not supported for the neox backbone")
    hidden = int(neox_key(neox_cfg, "hidden-size"))
    return ModelConfig(
        vocab_size=padded_vocab, padded_vocab_size=padded_vocab,
        hidden_size=hidden, num_layers=int(neox_key(neox_cfg, "num-layers")),
        num_heads=int(neox_key(neox_cfg, "num-attention-heads")),
        intermediate_size=int(neox_key(neox_cfg, "intermediate-size", 4 * hidden)),
        max_position_embeddings=int(neox_key(neox_cfg, "max-position-embeddings",
                                             neox_key(neox_cfg, "seq-length", 2048))),
        rotary_pct=float(neox_key(neox_cfg, "rotary-pct", 1.0)),
        rotary_base=float(neox_key(neox_cfg, "rotary-emb-base", 10000.0)),
        parallel_residual=bool(neox_key(neox_cfg, "gpt-j-residual", False)),
        layernorm_eps=float(neox_key(neox_cfg, "layernorm-epsilon", 1e-5)),
        tie_word_embeddings=not bool(neox_key(neox_cfg, "no-weight-tying", False)),
    )


def _torch_load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors/containers, or a torn file
        raise NeoXCheckpointError(f"cannot read {path} as a GPT-NeoX model-states file "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _layer_reader(folder: str, mp: int, layer_reads: int, bar) -> Callable[[int], list[dict]]:
    """``read(layer_index)`` -> the state dict of that pipeline layer on every TP rank.
    ``bar`` (tqdm) counts the shard files read: ``layer_reads`` files per rank of a pipeline
    model, one per rank of a sequential one."""
    pipe = os.path.join(folder, "layer_00-model_00-model_states.pt")
    sequential = [os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt") for r in range(mp)]

    def load(path: str) -> dict:
        state = _torch_load(path)
        bar.set_postfix_str(os.path.basename(path), refresh=False)
        bar.update(1)
        return state

    if os.path.exists(pipe):
        bar.reset(total=mp * layer_reads)
        def read(idx: int) -> list[dict]:
            files = [os.path.join(folder, f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
                     for r in range(mp)]
            for f in files:
                if not os.path.exists(f):
                    raise NeoXCheckpointError(
                        f"GPT-NeoX checkpoint {folder} lacks {os.path.basename(f)} (pipeline layer "
                        f"{idx}, model-parallel rank {files.index(f)} of {mp}); the folder is "
                        f"incomplete or model-parallel-size in the config is wrong.")
            return [load(f) for f in files]
        return read
    if os.path.exists(sequential[0]):
        for f in sequential:
            if not os.path.exists(f):
                raise NeoXCheckpointError(f"GPT-NeoX checkpoint {folder} lacks {os.path.basename(f)} "
                                          f"(model-parallel-size {mp})")
        bar.reset(total=mp)
        modules = [load(f) for f in sequential]
        modules = [m.get("module", m) for m in modules]

        def read(idx: int) -> list[dict]:
            prefix = f"sequential.{idx}."
            return [{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)} for m in modules]
        return read
    raise NeoXCheckpointError(
        f"'{folder}' is not a GPT-NeoX checkpoint folder: it has neither "
        f"layer_00-model_00-model_states.pt (pipeline model) nor mp_rank_00_model_states.pt "
        f"(sequential model). Pass the global_stepN folder itself.")


def _merge(parts: list[torch.Tensor], rule: str, parallel_residual: bool) -> torch.Tensor:
    if rule == "rows":
        return torch.cat(parts, dim=0)
    if rule == "cols":
        return torch.cat(parts, dim=1)
    if rule == "row_parallel_bias" and parallel_residual:
        return torch.stack(parts).sum(0)
    return torch.stack(parts).float().mean(0).to(parts[0].dtype) if rule == "mean" else parts[0]


def _take(layer: list[dict], names: tuple, where: str) -> list[torch.Tensor]:
    for name in names:
        if name in layer[0]:
            return [d[name] for d in layer]
    raise NeoXCheckpointError(f"GPT-NeoX checkpoint: {where} has no {' / '.join(names)} "
                              f"(found {sorted(layer[0])[:8]})")


def _check_used(layer: list[dict], used: set, where: str) -> None:
    extra = [k for k in layer[0] if k not in used and not _IGNORED.search(k)]
    if extra:
        raise NeoXCheckpointError(f"GPT-NeoX checkpoint: {where} holds tensors megaponder's "
                                  f"neox backbone has no place for: {extra[:5]}")


def neox_to_megaponder(folder: str, neox_cfg: dict,
                       progress: bool = False) -> tuple[ModelConfig, dict]:
    """(backbone shape, full backbone state dict under megaponder names) of a GPT-NeoX
    ``global_stepN`` folder. Reads one pipeline layer (all TP ranks) at a time; ``progress``:
    a bar on stderr counting the shard files read."""
    from tqdm import tqdm

    if not os.path.isdir(folder):
        raise NeoXCheckpointError(f"GPT-NeoX checkpoint folder '{folder}' does not exist")
    mp = int(neox_key(neox_cfg, "model-parallel-size", 1) or 1)
    num_layers = int(neox_key(neox_cfg, "num-layers", 0))
    # embedding, transformer layers, final norm, and the head unless tied to the embedding
    layer_reads = num_layers + 2 + bool(neox_key(neox_cfg, "no-weight-tying", False))
    with tqdm(desc="neox shards", unit="file", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        return _neox_to_megaponder(_layer_reader(folder, mp, layer_reads, bar), neox_cfg, num_layers)


def _neox_to_megaponder(read, neox_cfg: dict, num_layers: int) -> tuple[ModelConfig, dict]:
    emb = read(0)
    if "position_embeddings.weight" in emb[0]:
        raise NeoXCheckpointError("GPT-NeoX checkpoint has learned position embeddings; only "
                                  "rotary is supported")
    state = {"embed_in.weight": torch.cat(_take(emb, ("word_embeddings.weight",), "layer 0"), dim=0)}
    cfg = model_config_from_neox(neox_cfg, padded_vocab=state["embed_in.weight"].shape[0])
    for i in range(num_layers):
        layer, where, used = read(i + 2), f"pipeline layer {i + 2} (transformer layer {i})", set()
        for names, ours, rule in _LAYER_TENSORS:
            parts = _take(layer, names, where)
            used.update(n for n in names if n in layer[0])
            state[f"stack.layers.{i}.{ours}"] = _merge(parts, rule, cfg.parallel_residual)
        _check_used(layer, used, where)
    norm = read(num_layers + 3)
    state["stack.final_norm.weight"] = _merge(_take(norm, ("norm.weight",), "final norm"), "mean", False)
    state["stack.final_norm.bias"] = _merge(_take(norm, ("norm.bias",), "final norm"), "mean", False)
    if cfg.tie_word_embeddings:
        state["embed_out.weight"] = state["embed_in.weight"]
    else:
        head = read(num_layers + 4)
        state["embed_out.weight"] = torch.cat(_take(head, ("final_linear.weight",), "output layer"), dim=0)
    for name in ("embed_in.weight", "embed_out.weight"):
        if state[name].shape != (cfg.padded_vocab(), cfg.hidden_size):
            raise NeoXCheckpointError(f"GPT-NeoX checkpoint: {name} has shape {tuple(state[name].shape)}, "
                                      f"expected ({cfg.padded_vocab()}, {cfg.hidden_size})")
    return cfg, {k: v.float() for k, v in state.items()}


def neox_to_megaponder_checkpoint(folder: str, config_paths, output: str, family: str = "vanilla",
                                  tp: int = 1, pp: int = 1, vocab_size: Optional[int] = None,
                                  progress: bool = False):
    """Write a megaponder checkpoint of ``family`` from a GPT-NeoX ``global_stepN`` folder
    (``progress``: a bar on stderr over the shard files read)."""
    from .checkpoint import write_backbone_checkpoint

    cfg, backbone = neox_to_megaponder(folder, read_neox_config(config_paths), progress)
    return write_backbone_checkpoint(cfg, backbone, output, family, tp, pp, vocab_size, source=folder)
