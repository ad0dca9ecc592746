"""spearfl: online federated fine-tuning of language models from real-time user feedback (SPEAR)."""

__version__ = "0.1.0"
