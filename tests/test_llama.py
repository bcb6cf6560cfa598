"""The LLaMA backbone (``model.backbone: llama``): logits equal to Hugging Face's
``LlamaForCausalLM`` with the same weights, conversion both ways through
tools/convert_checkpoint.py, config validation, the official init per parameter group, and
the FLOPs formulas against torch's FlopCounterMode.

Tolerance 1e-5 (fp32): the same ops in the same order (RMSNorm statistics in fp32 in both,
rotate-half rotary, repeat_interleave GQA); observed max differences are <= 2.4e-7 with eager
attention and 0 with sdpa.
"""
import math
import os

import pytest
import torch

from megaponder.config import Config, ModelConfig
from megaponder.train.preflight import preflight
from megaponder.convert.hf import hf_config_from_model_config, hf_to_megaponder
from megaponder.models.base import CausalLM

from conftest import convert_tool

transformers = pytest.importorskip("transformers")


def _llama(**shape) -> ModelConfig:
    base = dict(backbone="llama", rotary_pct=1.0, parallel_residual=False, vocab_size=300,
                hidden_size=64, num_heads=4, num_layers=2, max_position_embeddings=64)
    base.update(shape)
    return ModelConfig(**base)


def _pair(seed, cfg: ModelConfig):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config_from_model_config(cfg)).eval()
    # HF initialises norms to one; randomise them so a swapped norm would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = CausalLM(cfg).eval()
    ours.load_state_dict(hf_to_megaponder(hf.state_dict(), cfg.num_layers, "llama"))
    return hf, ours


SHAPES = [
    dict(),                                                          # MHA, theta 1e4
    dict(num_kv_heads=2, rotary_base=500000.0),                      # GQA 2:1, llama-3 theta
    dict(hidden_size=48, num_heads=6, num_kv_heads=1, num_layers=3,  # MQA, odd ffn
         intermediate_size=77, layernorm_eps=1e-6),
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa-theta5e5", "mqa-oddffn"])
def test_logits_match_hf_llama(shape, backend):
    cfg = _llama(attention_backend=backend, **shape)
    hf, ours = _pair(0, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    with torch.no_grad():
        ref, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        real = mask.bool()
        assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=0), (got - ref)[real].abs().max()
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        ref_loss = hf(ids, labels=ids).loss
        got_loss = ours(ids[:, :-1], targets=ids[:, 1:]).loss
    assert abs(ref_loss.item() - got_loss.item()) < 1e-5


def _tool(*args):
    assert convert_tool().main(list(args)) == 0


def test_hf_llama_round_trip_and_family_init(tmp_path):
    """HF Llama (GQA) -> megaponder (vanilla, recorded tp2) -> HF: identical tensors and the
    plain LlamaForCausalLM class; --family ponderlm starts from the same backbone tensors."""
    import megaponder

    cfg = _llama(num_kv_heads=2, intermediate_size=90, rotary_base=500000.0,
                 max_position_embeddings=128)
    hf, _ = _pair(2, cfg)
    hf.save_pretrained(tmp_path / "hf")
    _tool("--from", "hf", "--to", "megaponder", "--input", str(tmp_path / "hf"),
          "--output", str(tmp_path / "mp"), "--tp", "2")
    model = megaponder.load_model(str(tmp_path / "mp"))
    assert model.cfg.backbone == "llama" and model.cfg.num_kv_heads == 2
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    _tool("--from", "megaponder", "--to", "hf", "--input", str(tmp_path / "mp"),
          "--output", str(tmp_path / "hf2"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert type(back).__name__ == "LlamaForCausalLM"
    original, returned = hf.state_dict(), back.state_dict()
    assert set(original) == set(returned)
    for name, tensor in original.items():
        assert torch.equal(tensor, returned[name]), name
    assert back.config.rope_parameters["rope_theta"] == 500000.0
    _tool("--from", "hf", "--to", "megaponder", "--input", str(tmp_path / "hf"),
          "--output", str(tmp_path / "pl"), "--family", "ponderlm")
    ponder = megaponder.load_model(str(tmp_path / "pl"))
    state = ponder.state_dict()
    for ours, tensor in model.state_dict().items():
        assert torch.equal(state[ours], tensor), ours


def test_llama_checkpoint_refuses_what_it_cannot_compute(tmp_path):
    from megaponder.convert.hf import model_config_from_hf

    bad = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                   intermediate_size=96, attention_bias=True, hidden_act="gelu")
    with pytest.raises(ValueError, match="attention_bias=true.*|hidden_act='gelu'"):
        model_config_from_hf(bad)


@pytest.mark.parametrize("change, message", [
    (dict(num_kv_heads=3), "num_kv_heads=3 must be a positive divisor"),
    (dict(rotary_pct=0.25), "rotary_pct=1.0"),
    (dict(parallel_residual=True), "parallel_residual=false"),
])
def test_llama_config_validation(change, message):
    cfg = Config(model=_llama(**change))
    with pytest.raises(ValueError, match=message):
        preflight(cfg, check_paths=False)


def test_gqa_needs_llama_and_tp_dividing_kv_heads():
    cfg = Config(model=ModelConfig(num_kv_heads=2))
    with pytest.raises(ValueError, match="needs model.backbone=llama"):
        preflight(cfg, check_paths=False)
    cfg = Config(model=_llama(num_kv_heads=1))
    cfg.parallel.tp = 2
    with pytest.raises(ValueError, match="does not divide model.num_kv_heads=1"):
        preflight(cfg, check_paths=False)


@pytest.mark.parametrize("family, depth, scaled", [("vanilla", 1, None), ("ponderlm", 1, None),
                                                   ("ponderlm", 4, True), ("pause", 1, None)])
def test_official_init_std_per_parameter_group(family, depth, scaled):
    """Truncated normal sigma = sqrt(2/(5d)) everywhere, o_proj/down_proj sigma/sqrt(2L*D),
    RMSNorm weights one. PonderLM's and PonderLM-2's Llama files have no depth factor (D = 1
    for every family); ponder.depth_scaled_init=true adds D = K+1 = 4 here."""
    from megaponder.config import PonderConfig
    from megaponder.models import build_model

    cfg = Config(model=_llama(family=family, hidden_size=128, num_layers=4, num_kv_heads=2,
                              intermediate_size=384, vocab_size=1024,
                              max_position_embeddings=128))
    cfg.ponder = PonderConfig(steps=3, depth_scaled_init=scaled)
    preflight(cfg, check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    sigma = math.sqrt(2 / (5 * 128))
    groups = {"in": [], "out": []}
    for name, p in model.stack.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            groups["out"].append(p.detach().flatten())
        elif name.endswith("proj.weight"):
            groups["in"].append(p.detach().flatten())
        else:
            assert torch.equal(p, torch.ones_like(p)), name  # RMSNorm
    # a +-3 sigma truncated normal has std 0.9866 sigma
    trunc = 0.98658
    expect = {"in": sigma * trunc, "out": sigma / math.sqrt(2 * 4 * depth) * trunc}
    for group, tensors in groups.items():
        x = torch.cat(tensors)
        assert abs(x.std().item() / expect[group] - 1) < 0.02, (group, x.std().item(), expect[group])
        assert x.abs().max().item() <= 3 * expect[group] / trunc + 1e-6
    for p in (model.embed_in.weight, model.embed_out.weight):
        assert abs(p.std().item() / (sigma * trunc) - 1) < 0.02


#: vanilla parameter counts of the llama recipes: 2·V·d (untied embedding + head) +
#: L·(4d² + 3·d·ffn + 2d) + d, V = 50304 (PonderLM-2's names count the non-head parameters:
#: 125M ~ 124M without the head, 410M ~ 407M and 1.4B ~ 1.41B with it)
RECIPE_PARAMS = {"125m": (768, 12, 2064), "410m": (1024, 24, 2752), "1.4b": (2048, 24, 5504)}


@pytest.mark.parametrize("size", sorted(RECIPE_PARAMS))
def test_llama_recipes_validate_and_build_on_meta(repo_root, size):
    """Every llama recipe validates and builds on the meta device (nothing allocated) with the
    paper's shape; the families add only their declared extra parameters."""
    from megaponder.config import load_config
    from megaponder.models import build_model
    from megaponder.models.base import num_parameters

    d, n_layers, ffn = RECIPE_PARAMS[size]
    expect = 2 * 50304 * d + n_layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
    for family in ("vanilla", "ponderlm", "adaponderlm", "ponderlm2", "ponderlm3"):
        cfg = load_config(os.path.join(repo_root, "examples", "configs", f"llama-{size}-{family}.yml"),
                          check_paths=False)
        assert (cfg.model.backbone, cfg.model.family, cfg.model.padded_vocab()) == ("llama", family, 50304)
        with torch.device("meta"):
            model = build_model(cfg)
        assert all(p.is_meta for p in model.parameters())
        extra = sum(p.numel() for n, p in model.named_parameters()
                    if n in set(model.extra_parameter_names()))
        assert num_parameters(model) - extra == expect, (family, num_parameters(model), expect)
        assert (extra > 0) == (family in ("adaponderlm", "ponderlm3")), (family, extra)  # gates/router
