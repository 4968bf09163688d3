"""Frozen bases that are not plain arrays: quantized weights (`quantized`: `QuantizedArray` and
its formats; `quantize`: `lorax.quantize` and GGUF blocks) and low-precision products (`precision`)."""
