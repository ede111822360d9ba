#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, each package's tests in an
# environment holding only that package's declared dependencies (on the default
# python3, then again on the machine's system interpreter when that differs),
# then the multi-process integration tests and benchmarks.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
cd "$ROOT"
PACKAGES=(pilot-transport pilot-node pilot-rpc pilot-worker pilot-checkpoint-sqlite pilot-channels langgraph-pilot)

step() { printf '\n==> %s\n' "$*"; }

step "uv lock --check, sync the full workspace"
"$UV" lock --check
"$UV" sync --frozen --all-packages

step "real servers the tests need (PostgreSQL, Redis) from Debian's packages"
source "$ROOT/scripts/_postgres.sh"
if [ -f "$ROOT/scripts/_redis.sh" ]; then
  source "$ROOT/scripts/_redis.sh"
fi
source "$ROOT/scripts/_iptables.sh"

step "ruff"
"$UV" run --frozen --no-sync ruff check .
"$UV" run --frozen --no-sync ruff format --check .

step "pyright (strict on packages/*/src)"
"$UV" run --frozen --no-sync pyright

for pkg in "${PACKAGES[@]}"; do
  step "$pkg: tests with only its declared dependencies"
  env_dir="$ROOT/.venvs/$pkg"
  UV_PROJECT_ENVIRONMENT="$env_dir" "$UV" sync --frozen --package "$pkg" --quiet
  # pytest-timeout bounds each test; the outer timeout bounds the whole step,
  # so a hang fails the run with a message instead of eating CI's budget.
  UV_PROJECT_ENVIRONMENT="$env_dir" timeout --kill-after=30 900 "$UV" run --frozen --no-sync --package "$pkg" \
    pytest "packages/$pkg/tests" -p no:cacheprovider --durations=5
done

# The machine's own interpreter too (Debian's /usr/bin/python3 is an older patch
# release with different OpenSSL defaults), when it is not the default python3.
SYSTEM_PYTHON=/usr/bin/python3
interpreter() { "$1" -c 'import sys; print(sys.base_prefix, sys.version.split()[0])'; }
if [ -x "$SYSTEM_PYTHON" ] && [ "$(interpreter "$SYSTEM_PYTHON")" != "$(interpreter python3)" ]; then
  for pkg in "${PACKAGES[@]}"; do
    step "$pkg: tests on the system interpreter $SYSTEM_PYTHON ($(interpreter "$SYSTEM_PYTHON"))"
    env_dir="$ROOT/.venvs/system-python/$pkg"
    UV_PROJECT_ENVIRONMENT="$env_dir" "$UV" sync --frozen --package "$pkg" --quiet --python "$SYSTEM_PYTHON"
    UV_PROJECT_ENVIRONMENT="$env_dir" timeout --kill-after=30 900 "$UV" run --frozen --no-sync --package "$pkg" \
      pytest "packages/$pkg/tests" -p no:cacheprovider -q
  done
fi

step "integration-tests (real processes, faults, benchmarks)"
timeout --kill-after=30 2700 "$UV" run --frozen --no-sync \
  pytest integration-tests/tests -p no:cacheprovider --durations=15

step "build each distribution alone and import its wheel in a clean venv"
dist_dir="$ROOT/.venvs/dist"
rm -rf "$dist_dir"
for pkg in "${PACKAGES[@]}"; do
  "$UV" build --quiet --package "$pkg" --out-dir "$dist_dir"
done
# Sibling wheels are named by path so nothing of ours is taken from an index.
declare -A NEEDS=(
  [pilot-transport]="pilot-transport"
  [pilot-node]="pilot-node"
  [pilot-rpc]="pilot-transport pilot-rpc"
  [pilot-worker]="pilot-transport pilot-rpc pilot-worker"
  [pilot-checkpoint-sqlite]="pilot-transport pilot-rpc pilot-worker pilot-checkpoint-sqlite"
  [pilot-channels]="pilot-transport pilot-rpc pilot-worker pilot-channels"
  [langgraph-pilot]="pilot-transport pilot-rpc pilot-worker pilot-checkpoint-sqlite pilot-channels langgraph-pilot"
)
for pkg in "${PACKAGES[@]}"; do
  module=$(python3 -c "import sys; n=sys.argv[1]; print('pilot_langgraph' if n == 'langgraph-pilot' else n.replace('-', '_'))" "$pkg")
  wheels=()
  for dep in ${NEEDS[$pkg]}; do
    wheels+=("$(ls "$dist_dir/${dep//-/_}"-*.whl)")
  done
  venv="$ROOT/.venvs/wheel-$pkg"
  rm -rf "$venv"
  "$UV" venv --quiet "$venv"
  VIRTUAL_ENV="$venv" "$UV" pip install --quiet "${wheels[@]}"
  "$venv/bin/python" -c "import $module; print('$pkg wheel imports as', $module.__name__)"
done
