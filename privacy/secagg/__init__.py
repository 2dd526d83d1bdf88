"""Secure aggregation for cross-silo federated learning (3–30 sites), transport-independent.

The coordinating server learns the sum of the sites' weighted, quantized updates and nothing else
about any single site's update, as long as it follows the protocol and fewer than ``threshold``
sites collude with it (Bonawitz et al., CCS 2017; Bell et al., CCS 2020). This package holds the
pure protocol: state objects for the site (:class:`SecAggSite`) and the server
(:class:`SecAggServer`, :class:`SecAggRound`), wire messages that convert to and from Flower
``ConfigRecord`` values, and the fixed-point encoding. A Flower strategy wrapper and client mod
drive it; nothing here imports Flower.

Design in one paragraph (full argument in ``DESIGN.md``). Each site publishes two X25519 public
keys once per key epoch (setup: one exchange). Every pair of sites derives a fresh pair-mask seed
per round with HKDF(shared secret, run ‖ round ‖ pair), so no per-round key exchange is needed.
In ``pairwise`` mode (default) a round is ONE exchange when every participant answers: each site
sends its update plus its pair masks in Z_{2^b} (4 bytes per parameter at b = 32), and the masks
cancel in the sum. If sites drop, the survivors reveal only that round's pair seeds with the
dropped sites (a second exchange); long-term keys are never reconstructed, so nothing has to be
re-keyed and no other round is exposed. ``pairwise`` mode relies on the server not recovering
dropouts before the round deadline (enforced here; the transport must reject replies after it).
``double`` mode adds Bonawitz's per-round self-mask, Shamir-shared in the same message as the
vector, so a late or withheld vector stays hidden even from a server that lies about who dropped:
two exchanges every round. Fewer survivors than the threshold abort the round
(:class:`SecAggAbortedError`); values outside the quantization range are clipped and counted,
never silently.

Granularity: the protection is per site (per hospital update), not per patient record; combine
with record-level DP-SGD for the latter.
"""

from __future__ import annotations

from .config import SecAggConfig
from .errors import MaskReuseError, QuantizationRangeError, SecAggAbortedError
from .messages import (
    KeyAdvertisement,
    MaskedInput,
    RoundRequest,
    SetupRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from .quantize import QuantizedUpdate, quantization_error_bound, quantize
from .server import SecAggResult, SecAggRound, SecAggServer
from .site import SecAggSite

__all__ = [
    "KeyAdvertisement",
    "MaskReuseError",
    "MaskedInput",
    "QuantizationRangeError",
    "QuantizedUpdate",
    "RoundRequest",
    "SecAggAbortedError",
    "SecAggConfig",
    "SecAggResult",
    "SecAggRound",
    "SecAggServer",
    "SecAggSite",
    "SetupRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "quantization_error_bound",
    "quantize",
]
