"""Run settings of secure aggregation, shared by the server and every site.

The settings that change the arithmetic or the security argument (`mode`, `bits`, `clip_range`,
`max_sites`, `threshold`) must be identical on both sides; their digest travels in every round
request and a site refuses a round whose digest differs from its own. `rounding` and
`on_out_of_range` are site-local choices and are not part of the digest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

from clinfed.errors import ConfigError

__all__ = [
    "MAX_SITE_ID",
    "MaskingMode",
    "OutOfRangePolicy",
    "Rounding",
    "SecAggConfig",
]

MaskingMode = Literal["pairwise", "double"]
Rounding = Literal["stochastic", "deterministic"]
OutOfRangePolicy = Literal["count", "raise"]

#: Site ids are small positive integers (the server maps Flower node ids onto 1..n).
MAX_SITE_ID: Final = 65_535
_MIN_BITS: Final = 8
_MAX_BITS: Final = 64


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings of one run.

    Attributes:
        mode: ``"pairwise"`` masks each update with pairwise masks only: a round costs one
            message exchange when no site drops and two when one does, and the server must
            follow the round deadline (DESIGN.md, "Late vectors"). ``"double"`` adds a per-round
            self-mask (Bonawitz et al. 2017): two exchanges every round, safe even against a
            server that lies about who dropped.
        bits: masked vectors live in Z_{2^bits}; ``ceil(bits / 8)`` bytes per parameter on the
            wire (32 → the size of a float32 model).
        clip_range: ``r`` > 0; every weighted value must lie in [-r, r]. Values outside are
            clipped *and counted*, never silently (see ``on_out_of_range``).
        max_sites: upper bound on the participants of a round; fixes the quantization scale so
            that the sum of ``max_sites`` values in [-r, r] cannot overflow.
        threshold: least number of sites whose sum the server may learn in a round; ``None``
            means a majority of the round's participants, and never fewer than 2.
        rounding: ``"stochastic"`` (unbiased, error < 1 step) or ``"deterministic"``
            (round half to even, error ≤ 1/2 step). Site-local.
        on_out_of_range: ``"count"`` clips, counts and reports; ``"raise"`` refuses to quantize
            an update with any value outside [-r, r]. Site-local.
    """

    mode: MaskingMode = "pairwise"
    bits: int = 32
    clip_range: float = 1.0
    max_sites: int = 30
    threshold: int | None = None
    rounding: Rounding = "stochastic"
    on_out_of_range: OutOfRangePolicy = "count"

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, get_args(MaskingMode))
        _check_choice("rounding", self.rounding, get_args(Rounding))
        _check_choice("on_out_of_range", self.on_out_of_range, get_args(OutOfRangePolicy))
        if type(self.bits) is not int or not _MIN_BITS <= self.bits <= _MAX_BITS:
            raise ConfigError(
                f"secagg `bits` must be an integer in {_MIN_BITS}..{_MAX_BITS}. "
                f"Found {self.bits!r}; 32 gives 4 bytes per parameter."
            )
        if (
            not isinstance(self.clip_range, int | float)
            or isinstance(self.clip_range, bool)
            or not math.isfinite(self.clip_range)
            or self.clip_range <= 0
        ):
            raise ConfigError(
                f"secagg `clip_range` must be a finite number > 0. Found {self.clip_range!r}; "
                "use at least the largest |weight x update| value a site may send."
            )
        if type(self.max_sites) is not int or not 2 <= self.max_sites <= MAX_SITE_ID:
            raise ConfigError(
                f"secagg `max_sites` must be an integer in 2..{MAX_SITE_ID}. "
                f"Found {self.max_sites!r}."
            )
        if self.level < 1:
            raise ConfigError(
                f"secagg `bits`={self.bits} leaves no quantization levels for "
                f"`max_sites`={self.max_sites}; raise `bits` or lower `max_sites`."
            )
        if self.threshold is not None and (
            type(self.threshold) is not int or not 2 <= self.threshold <= self.max_sites
        ):
            raise ConfigError(
                f"secagg `threshold` must be null or an integer in 2..max_sites "
                f"({self.max_sites}). Found {self.threshold!r}; a sum over fewer than 2 sites "
                "is one site's update."
            )

    @property
    def level(self) -> int:
        """Largest |quantized value| of one site, L = floor((2^(b-1) - 1) / max_sites).

        The sum of ``max_sites`` values in [-L, L] stays inside the signed range of Z_{2^b},
        so it never wraps.
        """
        return ((1 << (self.bits - 1)) - 1) // self.max_sites

    @property
    def scale(self) -> float:
        """Quantization steps per unit: a weighted value v is encoded as round(v * scale)."""
        return self.level / float(self.clip_range)

    def threshold_for(self, num_participants: int) -> int:
        """Threshold of a round with ``num_participants`` sites (see ``threshold``)."""
        if self.threshold is not None:
            return self.threshold
        return max(2, num_participants // 2 + 1)

    @property
    def digest(self) -> bytes:
        """16-byte digest of the settings both sides must share."""
        canonical = "|".join(
            (
                "clinfed/secagg/v1",
                self.mode,
                str(self.bits),
                float(self.clip_range).hex(),
                str(self.max_sites),
                str(self.threshold),
            )
        )
        return hashlib.sha256(canonical.encode()).digest()[:16]


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"secagg `{name}` must be one of {', '.join(allowed)}. Found {value!r}.")
