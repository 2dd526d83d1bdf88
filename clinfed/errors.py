"""Errors that clinfed raises for problems a user can fix.

Every error here is caused by input (a config, a site's data, a policy, a certificate, a message
from the network) or by a privacy invariant that would otherwise be broken. Their message is one
line that says what must hold, what was found and how to fix it; the command-line entry points print
it without a traceback and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ClinfedError",
    "ConfigError",
    "PrivacyError",
    "ProtocolError",
    "SiteDataError",
    "UpdateRejectedError",
]


class ClinfedError(Exception):
    """Base class of the errors a user can fix; ``str(error)`` is a one-line message."""


class ConfigError(ClinfedError, ValueError):
    """A configuration file, command-line override or site policy is invalid."""


class SiteDataError(ClinfedError, ValueError):
    """A site's data file or its schema does not hold what clinfed needs.

    Messages name the file and column, never a patient-level value.
    """


class PrivacyError(ClinfedError, RuntimeError):
    """A request would break a privacy invariant (budget, noise, secure aggregation)."""


class ProtocolError(ClinfedError, ValueError):
    """A message received over the network is malformed, replayed or out of order."""


class UpdateRejectedError(ClinfedError, ValueError):
    """A model update is unusable (NaN/Inf, wrong shape or dtype, norm beyond the bound).

    Raised by a site about its own update before it leaves (it is then never sent), and used by
    the server to name a site whose update it rejected before aggregation.
    """
