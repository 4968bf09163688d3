"""lorax's version: what checkpoints record, and `lorax.__version__`."""

__version__ = "0.1.0"
