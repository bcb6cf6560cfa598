"""Downstream evaluation: lm-evaluation-harness on megaponder checkpoints (``harness``, needs
the ``eval`` extra) and the offline tasks built from the demo corpus (``tasks``)."""
