#!/usr/bin/env bash
# Build deploy/containers/wheelhouse/ on the host, so that image builds install offline
# (`pip install --no-index --find-links`) and never reach a package index.
#
#   wheelhouse/deps/  every third-party wheel clinfed needs, torch as the CPU build (torch==2.13.0)
#   wheelhouse/app/   the clinfed wheel itself (rebuilt on every call; cheap)
#
# deps/ is rebuilt only when pyproject.toml's dependencies or the torch pin change (a stamp file
# records their hash), so the big download happens once. Set FORCE=1 to rebuild it anyway.
# PYTHON must be a Python 3.11 on Linux x86_64 (same ABI as the images); default: python3.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${WHEELHOUSE:-$here/wheelhouse}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

"$PYTHON" - <<'PY'
import sys, platform
if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
    sys.exit(f"build-wheelhouse.sh needs Python 3.11 on x86_64 (the images' ABI), got "
             f"{platform.python_version()} on {platform.machine()}; set PYTHON=")
PY

# The dependency list, straight from pyproject.toml (no second copy to keep in sync).
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
"$PYTHON" - "$repo/pyproject.toml" "$TORCH_PIN" >"$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(sys.argv[2])  # first: the CPU build, before anything can pull a CUDA one
print("\n".join(project["dependencies"]))
PY
stamp="$(sha256sum "$requirements" | cut -c1-16)"

mkdir -p "$out/deps" "$out/app"
if [ "${FORCE:-0}" = 1 ] || [ "$(cat "$out/deps/.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "wheelhouse: resolving and downloading dependencies into $out/deps"
    rm -rf "$out/deps" && mkdir -p "$out/deps"
    # `pip wheel` downloads wheels where they exist and builds the few sdists-only packages.
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$out/deps" -r "$requirements"
    echo "$stamp" >"$out/deps/.stamp"
else
    echo "wheelhouse: dependencies up to date ($out/deps)"
fi

echo "wheelhouse: building the clinfed wheel into $out/app"
rm -f "$out/app"/*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$out/app" "$repo"
ls -1 "$out/app"
echo "wheelhouse: $(ls "$out/deps" | grep -c '\.whl$') dependency wheels, $(du -sh "$out" | cut -f1)"
