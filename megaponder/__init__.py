"""megaponder: pretraining pondering language models at scale.

    import megaponder
    model = megaponder.load_model("runs/quickstart")        # run dir or checkpoint folder
    logits = model(input_ids).logits
"""
__version__ = "0.1.0"


def build_model(config):
    """A single-device model for a :class:`megaponder.config.Config` (fresh weights)."""
    from .models import build_model as _build

    return _build(config)


def load_model(path: str):
    """The model of a megaponder checkpoint, on CPU, in eval mode (any TP/PP it was saved with)."""
    from .train.checkpoint import load_model as _load

    return _load(path)


def load_config(path=None, overrides=()):
    from .config import load_config as _load

    return _load(path, overrides)


__all__ = ["build_model", "load_model", "load_config", "__version__"]
