"""The model: configs (config), the two towers (vision, text), the fusion encoder (fusion),
the EnVLF module that joins them and its ITC/ITM heads (core), safetensors checkpoints (checkpoint)
and the packaged pretrained trunk weights (weights)."""
