"""The family spec (megaponder/models/spec.py) is the one place a family is declared: a toy
family registered only from this file (tests/twice_family.py loaded as a module outside the
package, no line in the family table) gets config validation, FLOPs, cached decoding and the
family test matrix; a capability it does not declare is a one-line error naming it."""
import dataclasses
import importlib
import inspect
import os
import sys
import types

import pytest
import torch

from megaponder.config import FAMILIES, ConfigError, PonderConfig, load_config
from megaponder.infer import generate
from megaponder.models.decoders import decode_logits, make_decoder
from megaponder.models import CausalLM, build_model, flops
from megaponder.train.preflight import load_run_config
from megaponder.models.args import FAMILY_MODULES
from megaponder.models.spec import (BUILTIN_MODULES, FamilySpec, MissingCapability, family_names,
                                    family_spec, register_family, require)
from test_families_helpers import ALL_FAMILIES, BACKBONES, real_batch, tiny


def _user_module(path: str, name: str) -> types.ModuleType:
    """The family file at ``path`` (written as a file of megaponder/models/ is) as a user's own
    module ``name`` outside the package: its sibling imports made absolute."""
    with open(path) as f:
        source = f.read()
    absolute = source.replace("from .", "from megaponder.models.")
    assert absolute != source and "from ." not in absolute
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    exec(compile(absolute, path, "exec"), module.__dict__)
    return module


# the toy of tests/test_family_in_one_file.py (the stack run twice), registered from here
TwiceLM = _user_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "twice_family.py"),
                       "twice_family").TwiceLM
TOY = "twice"


class BareLM(CausalLM):
    """A family that declares nothing beyond its class."""


register_family(FamilySpec(name="toy_bare", model_cls=BareLM, kind="fixed"))


def test_light_name_list_equals_the_builtin_specs():
    def module(name):
        return "." + family_spec(name).model_cls.__module__.rpartition(".")[2]

    builtin = [n for n in family_names() if module(n) in BUILTIN_MODULES]
    assert sorted(builtin) == sorted(FAMILIES)
    assert {n: module(n) for n in builtin} == FAMILY_MODULES   # each where the table says
    assert ALL_FAMILIES == builtin   # the tests' family matrix is the registry's


@pytest.mark.parametrize("family", ALL_FAMILIES + [TOY])
def test_spec_matches_its_model(family):
    spec = family_spec(family)
    model = tiny(family, d=16, layers=1)
    assert type(model) is spec.model_cls and model.family == family
    keys = {f.name for f in dataclasses.fields(PonderConfig)}
    assert set(spec.ponder_keys) <= keys, set(spec.ponder_keys) - keys
    extra = model.extra_parameter_names()
    assert bool(extra) == bool(spec.extra_parameters)   # every declared prefix names parameters
    names = {n for n, _ in model.named_parameters()}
    for prefix in spec.extra_parameters:
        assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix


def test_toy_family_validates_in_config():
    cfg = load_config(None, [f"model.family={TOY}"], check_paths=False)
    assert type(build_model(cfg)) is TwiceLM
    with pytest.raises(ConfigError, match=rf"not model.family={TOY}"):
        load_run_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", f"model.family={TOY}"],
                        check_paths=False)
    with pytest.raises(ConfigError, match=r"'twise' is not one of.*Did you mean 'twice'"):
        load_config(None, ["model.family=twise"], check_paths=False)


# the family matrix: the same checks every built-in family runs (each module's tests take the
# family name); the toy needs no edit in any of them
MATRIX = ["test_families.test_family_trains_on_real_tokens",
          "test_families.test_init_family_from_backbone_keeps_backbone_tensors",
          "test_flops.test_training_flops_match_flop_counter",
          "test_flops.test_inference_flops_match_flop_counter",
          "test_generate.test_greedy_cached_equals_uncached",
          "test_families_consistency.test_fixed_depth_families_match_their_decoders"]


@pytest.mark.parametrize("check", MATRIX)
def test_toy_family_runs_the_family_matrix(check):
    module, name = check.split(".")
    test = getattr(importlib.import_module(module), name)
    if "backbone" in inspect.signature(test).parameters:   # checks run on every backbone
        for backbone in BACKBONES:
            test(TOY, backbone=backbone)
    else:
        test(TOY)


def test_toy_decoder_equals_forward_and_counts_two_passes():
    model = tiny(TOY).eval()
    ids, _ = real_batch(2, 9)
    ref = model(ids).logits
    logits, decs = decode_logits(model, ids, chunk=2, return_decoders=True)
    assert (logits - ref).abs().max().item() < 1e-5   # fp32, same ops in another order
    assert decs[0].executed().shape == (2, 9)
    # two stack passes and one head: twice vanilla's stack FLOPs, less than twice its total
    vanilla = flops.Dims(**{**flops.Dims.of(model).__dict__, "family": "vanilla"})
    ratio = flops.inference_flops(model, 9) / flops.inference_flops(vanilla, 9)
    assert 1.0 < ratio < 2.0


def test_missing_capabilities_are_errors_naming_them():
    model = tiny("toy_bare").eval()
    prompt = real_batch(1, 4)[0][0].tolist()
    with pytest.raises(MissingCapability, match=r"'toy_bare' does not support decoder"):
        make_decoder(model)
    with pytest.raises(MissingCapability, match=r"'toy_bare' does not support decoder"):
        generate(model, prompt, max_new_tokens=2, temperature=0.0)
    assert len(generate(model, prompt, max_new_tokens=2, temperature=0.0, cached=False)) == 2
    with pytest.raises(MissingCapability, match=r"'toy_bare' does not support train_flops"):
        flops.training_forward_flops(model, 8)
    with pytest.raises(MissingCapability, match=r"'toy_bare' does not support inference_flops"):
        flops.inference_flops(model, 8)
    with pytest.raises(MissingCapability, match=r"'loop' does not support sequence_parallel"):
        require("loop", "sequence_parallel")
    assert require("vanilla", "sequence_parallel") is True
    with pytest.raises(ValueError, match=r"unknown model family 'nope'"):
        family_spec("nope")
    with pytest.raises(TypeError, match="FamilySpec"):
        register_family("toy")
    assert torch.is_tensor(model(torch.tensor([prompt])).logits)
