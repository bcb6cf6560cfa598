"""Config loading, overrides, validation messages and the generated reference doc."""
import os

import pytest

from megaponder.config import ConfigError, load_config, reference_markdown
from megaponder.train.preflight import load_run_config

from conftest import REPO_ROOT


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "optim.lr=3e-4", "model.parallel_residual=false",
                             "data.path=[a, b]"], check_paths=False)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.parallel_residual is False
    assert cfg.data.path == ["a", "b"]


def test_unknown_key_names_the_key_and_the_nearest_one():
    with pytest.raises(ConfigError, match=r"Unknown config key 'model\.hiden_size'. Did you mean 'model\.hidden_size'\?"):
        load_config(None, ["model.hiden_size=64"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match=r"Unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.steps=1"])


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"num_heads=5 does not divide model\.hidden_size=128"):
        load_config(None, ["model.num_heads=5"])


def test_missing_data_path_says_how_to_fix_it(tmp_path):
    prefix = str(tmp_path / "nothing_text_document")
    with pytest.raises(ConfigError, match=r"nothing_text_document\.bin' does not exist.*prepare_demo_corpus"):
        load_config(None, [f"data.path=[{prefix}]"])


def test_bad_family_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"'adapondr' is not one of.*Did you mean 'adaponderlm'"):
        load_config(None, ["model.family=adapondr"])


def test_zero3_with_pipeline_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"zero_stage=3 cannot be combined with parallel\.pp=2"):
        load_config(None, ["parallel.pp=2", "parallel.zero_stage=3"])


def test_wrong_value_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(None, ["train.steps=many"])


def test_config_reference_is_current():
    with open(os.path.join(REPO_ROOT, "docs", "config.md")) as f:
        committed = f.read()
    assert committed == reference_markdown(), (
        "docs/config.md is stale: run `python -m megaponder.config > docs/config.md`")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO_ROOT, "examples", "configs"))))
def test_example_configs_load(name):
    load_run_config(os.path.join(REPO_ROOT, "examples", "configs", name), check_paths=False)


def test_sequence_parallel_families():
    # vertical pondering families shard inside the stack; latent layouts and loop are refused
    for family in ("vanilla", "ponderlm", "adaponderlm", "fixed_pruning", "random_halting"):
        load_run_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true",
                           f"model.family={family}"], check_paths=False)
    for family in ("ponderlm2", "ponderlm3", "pause", "loop"):
        with pytest.raises(ConfigError, match=rf"not model.family={family}"):
            load_run_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true",
                               f"model.family={family}"], check_paths=False)


def test_adaponderlm_pipeline_keeps_the_reused_kv_gradient():
    cfg = load_config(None, ["parallel.pp=2", "parallel.zero_stage=1", "model.family=adaponderlm",
                             "ponder.kv_reuse_grad=true"], check_paths=False)
    assert cfg.ponder.kv_reuse_grad


def test_backbone_sets_its_own_defaults():
    """rotary_pct / parallel_residual left null take the backbone's values, so switching the
    backbone of a NeoX config is one --set; an explicit value the backbone cannot run is still
    refused."""
    tiny = os.path.join(REPO_ROOT, "examples", "configs", "tiny.yml")
    neox = load_run_config(tiny, check_paths=False)
    assert (neox.model.rotary_pct, neox.model.parallel_residual) == (0.25, True)
    llama = load_run_config(tiny, ["model.backbone=llama"], check_paths=False)
    assert (llama.model.rotary_pct, llama.model.parallel_residual) == (1.0, False)
    with pytest.raises(ConfigError, match="set model.rotary_pct=1.0"):
        load_run_config(tiny, ["model.backbone=llama", "model.rotary_pct=0.25"], check_paths=False)
    with pytest.raises(ConfigError, match="set model.parallel_residual=false"):
        load_run_config(tiny, ["model.backbone=llama", "model.parallel_residual=true"], check_paths=False)
