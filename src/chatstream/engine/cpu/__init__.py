"""CPU-only parts of the engine: oneDNN-packed weights and fused norms, the fused decoder, runtime tuning."""
