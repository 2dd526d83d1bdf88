"""Fixed-point encoding of weighted float updates into Z_{2^b}, and back.

A site multiplies its update by its weight, checks the range [-r, r], and maps each value v to the
integer q = round(v * scale) with |q| ≤ L = floor((2^(b-1) - 1) / max_sites), stored modulo 2^b in
two's complement. The sum of at most ``max_sites`` such integers lies in (-2^(b-1), 2^(b-1)), so
reading the masked-and-unmasked total as a signed b-bit integer and dividing by ``scale`` gives the
sum of the weighted updates with no wraparound.

Error bound (stated once, asserted by the tests): for m summed sites,

    |dequantized sum - exact sum of weighted values| ≤ m * (delta / scale + r * 2^-50)

where delta = 1 for stochastic rounding (each value is rounded to one of its two neighbouring
steps, unbiasedly) and 1/2 for deterministic rounding; the r * 2^-50 term covers float64 rounding
of v * scale. The float32 result adds at most half a float32 ulp, 2^-24 * |sum|. Values outside
[-r, r] are clipped to the range and counted; the bound holds for the clipped values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .config import SecAggConfig
from .errors import QuantizationRangeError
from .keys import RandomBytes

__all__ = [
    "QuantizedUpdate",
    "dequantize",
    "quantization_error_bound",
    "quantize",
    "storage_dtype",
]

_FLOAT64_SLACK = 2.0**-50


def storage_dtype(bits: int) -> type[np.unsignedinteger]:
    """Smallest numpy unsigned type that holds Z_{2^bits} with native wraparound."""
    return np.uint32 if bits <= 32 else np.uint64


@dataclass(frozen=True)
class QuantizedUpdate:
    """One site's weighted update, encoded in Z_{2^bits} (flattened in C order).

    Attributes:
        values: unsigned integers < 2^bits, dtype uint32 (bits ≤ 32) or uint64.
        bits: the modulus exponent the values were encoded for.
        out_of_range: how many weighted values lay outside [-r, r] and were clipped. The site
            reports it locally; it also travels, masked, inside the site's vector, so the server
            learns only the round's total.
    """

    values: npt.NDArray[np.unsignedinteger]
    bits: int
    out_of_range: int


def quantize(
    update: npt.ArrayLike,
    *,
    weight: float,
    config: SecAggConfig,
    random_bytes: RandomBytes,
) -> QuantizedUpdate:
    """Encode ``weight * update`` for secure aggregation.

    Args:
        update: the site's model update (any shape, flattened in C order); float32 or float64.
        weight: the site's aggregation weight, e.g. its example count divided by a public upper
            bound, so that ``|weight * update| ≤ clip_range``. Must be finite and > 0.
        config: the run's settings (``bits``, ``clip_range``, ``max_sites``, ``rounding``,
            ``on_out_of_range``).
        random_bytes: randomness for stochastic rounding (``os.urandom``).

    Raises:
        QuantizationRangeError: the update has non-finite values, or values outside the range
            while ``on_out_of_range == "raise"``.
    """
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"secagg weight must be a finite number > 0. Found {weight!r}.")
    values = np.asarray(update)
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(
            f"secagg quantize expects a float32/float64 update. Found dtype {values.dtype}."
        )
    # One float64 working buffer, transformed in place (this runs on every site every round).
    weighted = np.multiply(values.ravel(), float(weight), dtype=np.float64)
    if not np.isfinite(weighted.sum()) and not np.isfinite(weighted).all():
        finite = np.isfinite(weighted)
        raise QuantizationRangeError(
            f"the weighted update holds {int(np.count_nonzero(~finite))} non-finite values "
            "(NaN or inf) that secure aggregation cannot encode; training probably diverged."
        )
    r = float(config.clip_range)
    out_of_range = int(np.count_nonzero(weighted > r)) + int(np.count_nonzero(weighted < -r))
    if out_of_range and config.on_out_of_range == "raise":
        raise QuantizationRangeError(
            f"{out_of_range} of {weighted.size} weighted values lie outside "
            f"[-{r}, {r}]; raise secagg `clip_range`, lower the weight, or clip updates "
            "before aggregation (set on_out_of_range='count' to clip and report instead)."
        )
    np.clip(weighted, -r, r, out=weighted)
    weighted *= config.scale
    if config.rounding == "stochastic":
        seed = int.from_bytes(random_bytes(32), "big")
        weighted += np.random.Generator(np.random.PCG64(seed)).random(weighted.size)
        np.floor(weighted, out=weighted)
    else:
        np.rint(weighted, out=weighted)
    # Float rounding of v * scale (and of L itself, for b > 53) may land a step outside [-L, L];
    # clipping the integers keeps the no-overflow guarantee exact.
    signed = weighted.astype(np.int64)
    np.clip(signed, -config.level, config.level, out=signed)
    encoded = _to_ring(signed, config.bits)
    return QuantizedUpdate(values=encoded, bits=config.bits, out_of_range=out_of_range)


def dequantize(
    total: npt.NDArray[np.unsignedinteger], *, config: SecAggConfig
) -> npt.NDArray[np.float32]:
    """Decode a sum of quantized vectors (values in Z_{2^bits}) into float32 values."""
    signed = _from_ring(total, config.bits)
    return (signed.astype(np.float64) / config.scale).astype(np.float32)


def quantization_error_bound(config: SecAggConfig, *, num_sites: int) -> float:
    """Bound on |dequantized sum - exact weighted sum| per value, before the float32 cast."""
    delta = 1.0 if config.rounding == "stochastic" else 0.5
    return num_sites * (delta / config.scale + float(config.clip_range) * _FLOAT64_SLACK)


def _to_ring(signed: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.unsignedinteger]:
    if bits == 32:  # integer casts wrap: two's complement mod 2^32 in one pass
        return signed.astype(np.uint32)
    as_unsigned = signed.astype(np.uint64)  # two's complement wraparound, i.e. mod 2^64
    if bits < 64:
        as_unsigned &= np.uint64((1 << bits) - 1)
    return as_unsigned.astype(storage_dtype(bits))


def _from_ring(values: npt.NDArray[np.unsignedinteger], bits: int) -> npt.NDArray[np.int64]:
    # Sign-extend from bit b-1: move it to bit 63, then shift back arithmetically.
    shift = np.uint64(64 - bits)
    return (values.astype(np.uint64) << shift).view(np.int64) >> np.int64(shift)
