"""Quantized bases: NF4 (QLoRA) and LSQ quantization-aware LoRA (L4Q)."""
