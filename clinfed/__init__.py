"""clinfed: federated learning for hospitals.

Sites train locally with differential privacy (Opacus DP-SGD) and the server aggregates their
updates; no patient record leaves a hospital. Packages: :mod:`clinfed.client` (runs in the
hospital), :mod:`clinfed.server` (runs at the coordinating lab), :mod:`clinfed.privacy`
(accounting, secure aggregation), :mod:`clinfed.models` (the model zoo).
"""

from clinfed.errors import ClinfedError

__version__ = "0.1.0"

__all__ = ["ClinfedError", "__version__"]
