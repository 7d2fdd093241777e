"""The numbers of spec/llm-codec.md §5 that both sides of the integer engines compute
with: the spec's operations as torch ops (:mod:`llmarc.inference.integer`) and the compiled
CPU kernels (:mod:`llmarc.inference.kernels`) that must match them bit for bit.  A module
of its own so that the kernels need nothing of the model that calls them."""

from __future__ import annotations

from llmarc.entropy.quantize import MIN_EXPONENT

#: Fractional bits of the residual stream: h is stored as the integer round(h * 2^24).
RESIDUAL_BITS = 24
#: RMSNorm squares the residual shifted down to at most this many bits (exact sums).
NORM_BITS = 20
#: Largest magnitude of a linear layer's quantized input, and of a weight.
LINEAR_LEVELS = 127
WEIGHT_LEVELS = 127
#: 2^31: the weight of the top score in the exponential table (EXP2_TABLE[0]).
EXP_ONE = float(1 << 31)
MAX_EXP_INDEX = -MIN_EXPONENT  # 10240: WEIGHTS[10240] == 0
