"""Shared by the benchmark scripts: the tiny per-family configs (examples/configs), optionally
resized to a benchmark's shape."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config_path(family: str) -> str:
    """examples/configs/tiny.yml for vanilla, tiny-<family>.yml otherwise."""
    return os.path.join(ROOT, "examples", "configs", "tiny.yml" if family == "vanilla" else f"tiny-{family}.yml")


def sized_config(family: str, hidden: int, layers: int, vocab: int, seq: int, extra=()):
    """The tiny config of ``family`` at width ``hidden`` (64-dim heads), ``layers`` layers,
    vocabulary ``vocab`` and sequence length ``seq``, sdpa attention, plus ``extra``
    ``section.key=value`` overrides."""
    from megaponder.config import load_config
    return load_config(tiny_config_path(family), [
        f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.num_heads={hidden // 64}",
        f"model.vocab_size={vocab}", f"model.max_position_embeddings={seq}", f"data.seq_length={seq}",
        "model.attention_backend=sdpa", *extra], check_paths=False)
