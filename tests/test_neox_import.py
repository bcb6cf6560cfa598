"""GPT-NeoX native checkpoints in: the test writes a global_stepN folder in GPT-NeoX's own
layout (pipeline-module layer files, or the sequential mp_rank files) at model-parallel 2 from
a random Hugging Face GPTNeoXForCausalLM, split the way GPT-NeoX's tensor parallelism stores
it, and checks the conversion equals the Hugging Face form's."""
import os
import pytest
import torch
import yaml

from conftest import convert_tool

transformers = pytest.importorskip("transformers")

MP = 2


def _split(t: torch.Tensor, dim: int) -> list:
    return list(t.chunk(MP, dim=dim))


def write_neox_checkpoint(hf_model, folder, parallel_residual: bool, sequential: bool,
                          legacy_names: bool = True) -> None:
    """What GPT-NeoX's DeepSpeed engine saves at model-parallel MP (see
    megaponder/convert/neox_native.py for the layer numbering and the split rules)."""
    sd, n = hf_model.state_dict(), hf_model.config.num_hidden_layers
    fc1, fc2 = ("dense_h_to_4h", "dense_4h_to_h") if legacy_names else ("linear1", "linear2")
    layers: dict[int, list[dict]] = {}
    layers[0] = [{"word_embeddings.weight": w} for w in _split(sd["gpt_neox.embed_in.weight"], 0)]
    for i in range(n):
        p = f"gpt_neox.layers.{i}."
        ranks = [dict() for _ in range(MP)]
        for r in range(MP):
            for ln in ("input_layernorm", "post_attention_layernorm"):
                for kind in ("weight", "bias"):
                    ranks[r][f"{ln}.{kind}"] = sd[p + f"{ln}.{kind}"].clone()
            ranks[r]["attention.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer NeoX keeps
        column = {"attention.query_key_value": "attention.query_key_value", f"mlp.{fc1}": "mlp.dense_h_to_4h"}
        for ours, hf in column.items():
            for kind in ("weight", "bias"):
                for r, part in enumerate(_split(sd[p + f"{hf}.{kind}"], 0)):
                    ranks[r][f"{ours}.{kind}"] = part.clone()
        for ours, hf in {"attention.dense": "attention.dense", f"mlp.{fc2}": "mlp.dense_4h_to_h"}.items():
            for r, part in enumerate(_split(sd[p + f"{hf}.weight"], 1)):
                ranks[r][f"{ours}.weight"] = part.clone()
            bias = sd[p + f"{hf}.bias"]
            for r in range(MP):  # parallel residual: each rank adds its share before the all-reduce
                ranks[r][f"{ours}.bias"] = bias / MP if parallel_residual else bias.clone()
        layers[i + 2] = ranks
    layers[n + 3] = [{"norm.weight": sd["gpt_neox.final_layer_norm.weight"].clone(),
                      "norm.bias": sd["gpt_neox.final_layer_norm.bias"].clone()} for _ in range(MP)]
    if not hf_model.config.tie_word_embeddings:
        head = sd.get("embed_out.weight", sd.get("lm_head.weight"))
        layers[n + 4] = [{"final_linear.weight": w} for w in _split(head, 0)]
    os.makedirs(folder)
    if sequential:
        for r in range(MP):
            module = {f"sequential.{idx}.{k}": v[r][k] for idx, v in layers.items() for k in v[r]}
            torch.save({"module": module, "dp_world_size": 1, "mp_world_size": MP},
                       os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"))
    else:
        for idx, ranks in layers.items():
            for r, state in enumerate(ranks):
                torch.save(state, os.path.join(folder, f"layer_{idx:02d}-model_{r:02d}-model_states.pt"))


def neox_yaml(hf_config, path) -> None:
    c = hf_config
    rope = getattr(c, "rope_parameters", None) or {}
    tree = {"num-layers": c.num_hidden_layers, "hidden-size": c.hidden_size,
            "num-attention-heads": c.num_attention_heads, "seq-length": 64,
            "max-position-embeddings": c.max_position_embeddings, "pos-emb": "rotary",
            "rotary-pct": rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 0.25)),
            "no-weight-tying": not c.tie_word_embeddings, "gpt-j-residual": c.use_parallel_residual,
            "norm": "layernorm", "activation": "gelu", "model-parallel-size": MP,
            "pipe-parallel-size": 1, "make-vocab-size-divisible-by": 128}
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)


def convert(*args) -> int:
    """tools/convert_checkpoint.py's main, in this process."""
    return convert_tool().main([str(a) for a in args])


@pytest.mark.parametrize("parallel_residual,tied,sequential", [
    (True, False, False),   # Pythia: gpt-j-residual, untied head, pipeline-module files
    (False, True, True),    # sequential residual, tied head, pipe-parallel-size 0 files
], ids=["pythia-pipeline", "sequential-tied"])
def test_neox_checkpoint_converts_to_the_hf_forms_model(tmp_path, parallel_residual, tied, sequential):
    from megaponder import load_model
    from megaponder.convert.checkpoint import hf_to_megaponder_checkpoint
    from megaponder.convert.hf import hf_config_from_model_config
    from megaponder.config import ModelConfig

    shape = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        max_position_embeddings=128, rotary_pct=0.25,
                        parallel_residual=parallel_residual, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_config_from_model_config(shape))
    with torch.no_grad():  # biases and norms are zeros/ones at init: make every tensor count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_megaponder_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ref"))
    write_neox_checkpoint(hf, str(tmp_path / "global_step7"), parallel_residual, sequential,
                          legacy_names=not sequential)
    neox_yaml(hf.config, tmp_path / "neox.yml")
    assert convert("--from", "neox", "--to", "megaponder", "--input", tmp_path / "global_step7",
                   "--config", tmp_path / "neox.yml", "--output", tmp_path / "out") == 0

    ref, got = load_model(str(tmp_path / "ref")), load_model(str(tmp_path / "out"))
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = hf(ids).logits
        a, b = ref(ids).logits, got(ids).logits
    assert (a - want).abs().max() < 1e-5   # the reference itself is Hugging Face's model
    assert (b - a).abs().max() < 1e-5, (b - a).abs().max()


def test_neox_folder_with_missing_layer_file_fails_with_one_line(tmp_path, capsys):
    from megaponder.convert.hf import hf_config_from_model_config
    from megaponder.config import ModelConfig

    shape = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                        max_position_embeddings=64)
    hf = transformers.GPTNeoXForCausalLM(hf_config_from_model_config(shape))
    folder = tmp_path / "global_step1"
    write_neox_checkpoint(hf, str(folder), parallel_residual=True, sequential=False)
    neox_yaml(hf.config, tmp_path / "neox.yml")
    os.remove(folder / "layer_03-model_01-model_states.pt")
    rc = convert("--from", "neox", "--to", "megaponder", "--input", folder, "--config",
                 tmp_path / "neox.yml", "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "layer_03-model_01-model_states.pt" in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_progress_bars_on_stderr_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    """--progress: a bar over the GPT-NeoX shard files read (2 ranks x 5 pipeline layers) and
    transformers' own per-tensor bar for a Hugging Face import; by default (stderr is not a
    terminal here) and with --no-progress: no bar at all, stdout unchanged."""
    from megaponder.convert.hf import hf_config_from_model_config
    from megaponder.config import ModelConfig

    shape = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                        max_position_embeddings=64)
    hf = transformers.GPTNeoXForCausalLM(hf_config_from_model_config(shape))
    hf.save_pretrained(tmp_path / "hf")
    write_neox_checkpoint(hf, str(tmp_path / "global_step1"), parallel_residual=True, sequential=False)
    neox_yaml(hf.config, tmp_path / "neox.yml")
    neox = ["--from", "neox", "--to", "megaponder", "--input", tmp_path / "global_step1",
            "--config", tmp_path / "neox.yml"]
    hf_in = ["--from", "hf", "--to", "megaponder", "--input", tmp_path / "hf"]
    capsys.readouterr()
    outputs = {}
    for name, args in (("neox", neox), ("hf", hf_in)):
        for flag in ("--progress", "--no-progress", None):
            out = tmp_path / f"{name}-{flag}"
            assert convert(*args, "--output", out, *([flag] if flag else [])) == 0
            outputs[name, flag] = capsys.readouterr()
    err = outputs["neox", "--progress"].err
    assert "neox shards: 100%" in err and "10/10" in err, err
    assert "Loading weights" in outputs["hf", "--progress"].err
    for key in [("neox", "--no-progress"), ("neox", None), ("hf", "--no-progress"), ("hf", None)]:
        assert outputs[key].err == "", (key, outputs[key].err)
    for name in ("neox", "hf"):
        assert len({outputs[name, f].out.replace(f"{name}-{f}", "") for f in ("--progress", "--no-progress", None)}) == 1
