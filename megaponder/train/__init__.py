from .checkpoint import load_model, resolve_checkpoint
from .loop import Trainer, train

__all__ = ["Trainer", "train", "load_model", "resolve_checkpoint"]
