"""The CVR network, its gated LoRA adapters, and the feature encoding both parties share."""
