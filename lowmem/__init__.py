"""lowmem: fine-tune language models on one GPU that does not have enough memory."""

__version__ = "0.1.0"
