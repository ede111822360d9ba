# Sourced by the other scripts: finds uv, or installs it from PyPI into
# .tools/ (a private venv of this checkout) when the machine has none.
# uv is told never to download a Python: the machine's python3 (>= 3.11) is used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export UV_PYTHON_DOWNLOADS=never
export UV_PYTHON="${UV_PYTHON:-python3}"
# Trust the machine's certificate store too (TLS-intercepting proxies in front
# of PyPI are common on build machines); older uv reads the first name.
export UV_NATIVE_TLS="${UV_NATIVE_TLS:-true}"
export UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-true}"
if [ -x "$ROOT/.tools/bin/uv" ]; then
  UV="$ROOT/.tools/bin/uv"
elif command -v uv >/dev/null 2>&1; then
  UV="$(command -v uv)"
else
  echo "uv not found: installing it from PyPI into $ROOT/.tools" >&2
  python3 -m venv "$ROOT/.tools"
  "$ROOT/.tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.8"
  UV="$ROOT/.tools/bin/uv"
fi
export UV
