"""clinfed: federated learning for hospitals.

Sites train locally with differential privacy (Opacus DP-SGD) and the server aggregates their
updates; no patient record leaves a hospital. Packages: :mod:`clinfed.client` (runs in the
hospital), :mod:`clinfed.server` (runs at the coordinating lab), :mod:`clinfed.privacy`
(accounting, secure aggregation), :mod:`clinfed.models` (the model zoo).
"""

from pathlib import Path as _Path

from clinfed.errors import ClinfedError

__version__ = "0.1.0"

__all__ = ["ClinfedError", "__version__"]

# In the source tree (and in a Flower app bundle built from it) the subpackages are the folders
# beside this one — `client/`, `server/`, `models/`, `privacy/` — while an installed wheel puts
# them inside `clinfed/`. When this folder sits in a source tree, also look for subpackages next
# to it, so that `import clinfed.client` works from the repository root and inside a FAB.
_here = _Path(__file__).resolve().parent
if not (_here / "client").is_dir() and (_here.parent / "client" / "app.py").is_file():
    __path__.append(str(_here.parent))
