"""Export a megaponder checkpoint of any family as a Hugging Face ``save_pretrained`` folder,
and import such a folder back.

* vanilla -> ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` by ``model.backbone`` (plain
  transformers, no remote code).
* every other family -> ``MegaponderForCausalLM``, ``trust_remote_code``: the folder holds
  byte copies of the model core's files (megaponder/models/: the wrapper hf_model.py and
  hf_config.py, the families, backbones, decoders and every file they import, torch +
  transformers only), two generated entry points (configuration_megaponder.py,
  modeling_megaponder.py: config.json's ``auto_map``), ``model.safetensors`` under
  megaponder's own parameter names, and the tokenizer (megaponder/convert/tokenizer.py).

Importing an export back (``--from hf --to megaponder``) reads the megaponder config stored in
``config.json`` and the safetensors as they are, so tensors and config come back unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from ..config import Config, config_from_dict
from ..models import spec as model_spec
from ..models.spec import BUILTIN_MODULES, family_names, family_spec
from ..train.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, checkpoint_tokenizer_path, write_model_files

REMOTE_MODEL_TYPE = "megaponder"
#: config.json's auto_map: the two generated entry points below
AUTO_MAP = {"AutoConfig": "configuration_megaponder.MegaponderConfig",
            "AutoModelForCausalLM": "modeling_megaponder.MegaponderForCausalLM"}
CONFIG_ENTRY = '''"""AutoConfig entry point (config.json's auto_map) of this megaponder export, written by
megaponder's exporter; the other .py files here are byte copies of megaponder/models/."""
from .hf_config import MegaponderConfig  # noqa: F401
'''
MODEL_ENTRY = '''"""AutoModelForCausalLM entry point (config.json's auto_map) of this megaponder export, written
by megaponder's exporter; the other .py files here are byte copies of megaponder/models/.
Importing the family modules registers their FamilySpecs (and makes transformers copy them).
"""
{imports}
from .hf_model import MegaponderForCausalLM  # noqa: F401
'''


def _core_dir() -> str:
    return os.path.dirname(os.path.abspath(model_spec.__file__))


def _family_modules(family: str) -> list[str]:
    """Modules (names under models/) that declare the built-in families and ``family``."""
    module = family_spec(family).model_cls.__module__
    package = model_spec.__name__.rpartition(".")[0]
    if module.rpartition(".")[0] != package:
        raise ValueError(f"family '{family}' is declared in {module}, outside {package}: the "
                         f"Hugging Face export copies the model core only; move the family's "
                         f"module into megaponder/models/ and add it to FAMILY_MODULES")
    names = [m.lstrip(".") for m in BUILTIN_MODULES]
    short = module.rpartition(".")[2]
    return names + ([short] if short not in names else [])


def write_model_code(output: str, family: str) -> list[str]:
    """Copy the model core files an export of ``family`` imports into ``output`` and write the
    entry points; returns the file names. The files are those transformers' loader follows
    (relative imports, recursively, from the entry points), so the folder holds what loading
    it needs."""
    from transformers.dynamic_module_utils import get_relative_import_files

    core = _core_dir()
    modules = _family_modules(family)
    classes: dict[str, set] = {}
    for name in family_names():   # the class names the entry point imports, per module
        cls = family_spec(name).model_cls
        classes.setdefault(cls.__module__.rpartition(".")[2], set()).add(cls.__name__)
    imports = "\n".join(f"from .{m} import {', '.join(sorted(classes[m]))}  # noqa: F401"
                         for m in modules)
    entries = {"configuration_megaponder.py": CONFIG_ENTRY,
               "modeling_megaponder.py": MODEL_ENTRY.format(imports=imports)}
    copied = set()
    for start in ["hf_model", "hf_config", *modules]:
        path = os.path.join(core, f"{start}.py")
        copied |= {path, *get_relative_import_files(path)}
    for path in sorted(copied):
        shutil.copyfile(path, os.path.join(output, os.path.basename(path)))
    for name, text in entries.items():
        with open(os.path.join(output, name), "w") as f:
            f.write(text)
    return sorted([os.path.basename(p) for p in copied] + list(entries))


def export_checkpoint(path: str, output: str) -> str:
    """Write the Hugging Face folder of megaponder checkpoint (or run dir) ``path``; returns
    the class name written."""
    from ..safe_files import staged_output

    folder = resolve_checkpoint(path)
    cfg = read_checkpoint_config(folder)
    model = load_model(folder)
    with staged_output(output) as stage:  # save_pretrained opens by name: never via a planted link
        return _export(folder, cfg, model, stage)


def _export(folder: str, cfg, model, output: str) -> str:
    from transformers import GenerationConfig

    from .hf import HF_HEAD_NAMES, hf_config_from_model_config, hf_model_class, megaponder_to_hf
    from .tokenizer import export_tokenizer

    tok_path = checkpoint_tokenizer_path(folder)
    tok = export_tokenizer(tok_path, output, cfg.model.max_position_embeddings) if tok_path else None
    special = {"eos_token_id": tok.eod, "pad_token_id": tok.pad} if tok is not None else {}
    state = model.state_dict()
    if family_spec(cfg.model.family).plain_backbone:
        backbone = cfg.model.backbone
        hf = hf_model_class(backbone)(hf_config_from_model_config(cfg.model, **special))
        head_name = next(n for n in HF_HEAD_NAMES if n in hf.state_dict())
        hf.load_state_dict(megaponder_to_hf(state, cfg.model.num_layers, head_name, backbone),
                           strict=True)
    else:
        from ..models import hf_model

        hf = hf_model.MegaponderForCausalLM(
            hf_model.MegaponderConfig(megaponder_config=cfg.to_dict(), **special))
        hf.load_state_dict(state, strict=True)
        hf.config.auto_map = AUTO_MAP
    hf.generation_config = GenerationConfig(**special)
    hf.save_pretrained(output)
    if not family_spec(cfg.model.family).plain_backbone:
        write_model_code(output, cfg.model.family)
    return type(hf).__name__


def is_megaponder_export(hf_dir: str) -> bool:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") == REMOTE_MODEL_TYPE


def import_export(hf_dir: str, output: str, family: str = "vanilla", tp: Optional[int] = None,
                  pp: Optional[int] = None) -> Config:
    """megaponder checkpoint of a ``MegaponderForCausalLM`` folder written by
    :func:`export_checkpoint`: the same tensors and config (``tp``/``pp`` replace the
    recorded layout when given)."""
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    stored = hf_cfg.get("megaponder_config")
    if not stored:
        raise ValueError(f"{hf_dir}/config.json has model_type 'megaponder' but no "
                         f"megaponder_config; re-export it with tools/convert_checkpoint.py")
    cfg = config_from_dict(stored, check_paths=False)
    # --family names a family to build on a plain backbone checkpoint; an export has its own
    if family != cfg.model.family and not family_spec(family).plain_backbone:
        raise ValueError(f"{hf_dir} holds a '{cfg.model.family}' model; drop --family "
                         f"{family} (an export keeps its family)")
    if tp is not None:
        cfg.parallel.tp = tp
    if pp is not None:
        cfg.parallel.pp = pp
    weights = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{hf_dir} has no model.safetensors (sharded exports are not "
                                f"supported here)")
    state = load_file(weights)
    from ..models import build_model

    model = build_model(cfg)
    own = model.state_dict()
    if cfg.model.tie_word_embeddings and "embed_out.weight" not in state:
        state["embed_out.weight"] = state["embed_in.weight"]  # safetensors stores a tie once
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{weights} does not match a '{cfg.model.family}' model: missing "
                       f"{missing[:5]}, unexpected {unexpected[:5]}")
    tok = os.path.join(hf_dir, "tokenizer.json")
    meta = {"step": 0, "source": os.path.abspath(hf_dir), "family": cfg.model.family,
            "tp": cfg.parallel.tp, "pp": cfg.parallel.pp}
    write_model_files(output, cfg, {k: state[k].to(own[k].dtype) for k in own}, meta,
                      tok if os.path.exists(tok) else None)
    return cfg
