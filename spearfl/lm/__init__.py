"""The language model: base model loading and LoRA, the forward and prefill engine, key/value reuse, generation,
and the training batch. Knows nothing of federated learning or of any algorithm."""
