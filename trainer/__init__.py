"""DPO + LoRA on a finished pair set: config, data, train loop callbacks (the RQ task comes on top)."""
