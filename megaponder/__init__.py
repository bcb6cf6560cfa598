"""megaponder: pretraining pondering language models at scale."""
__version__ = "0.1.0"
