"""Errors specific to secure aggregation; all derive from :mod:`clinfed.errors`."""

from __future__ import annotations

from collections.abc import Iterable

from clinfed.errors import PrivacyError

__all__ = ["MaskReuseError", "QuantizationRangeError", "SecAggAbortedError"]


class SecAggAbortedError(PrivacyError):
    """A round cannot produce a sum without breaking the threshold; keep the previous model.

    ``missing`` names the sites whose message did not arrive (or whose absence caused the abort),
    so the caller can report them and start the next round without them.
    """

    def __init__(self, message: str, *, round_id: int, missing: Iterable[int]) -> None:
        super().__init__(message)
        self.round_id = round_id
        self.missing: tuple[int, ...] = tuple(sorted(missing))


class MaskReuseError(PrivacyError):
    """A site was asked to mask a second vector with keys of a round it already used.

    Two vectors masked with the same round keys differ by exactly their updates (a two-time pad);
    after a dropout recovery the server even holds that round's pair masks. Rounds are single-use.
    """


class QuantizationRangeError(PrivacyError):
    """A weighted update cannot be encoded as the configuration asks.

    Raised for non-finite values (always), and for values outside [-clip_range, clip_range]
    when ``on_out_of_range == "raise"`` (otherwise they are clipped and counted).
    """
