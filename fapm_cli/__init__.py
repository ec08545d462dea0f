"""fapm: forgetting-aware pruning of fine-tuned checkpoints (FAPM, EMNLP 2025)."""

__version__ = "0.1.0"
