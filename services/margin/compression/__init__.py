"""Model compression: pruning, quantization, distillation, sensitivity analysis and measurement."""
