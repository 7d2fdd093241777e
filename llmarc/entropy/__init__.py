"""Model-free, exactly specified integer math: logits -> frequencies -> range-coded bytes.

Both halves are specified byte for byte in spec/entropy.md so that an independent decoder
can reproduce them; neither uses floating-point beyond one IEEE-754 float64 multiply.
"""

from llmarc.entropy.quantize import logits_to_frequencies
from llmarc.entropy.rangecoder import RangeDecoder, RangeEncoder

__all__ = ["RangeDecoder", "RangeEncoder", "logits_to_frequencies"]
