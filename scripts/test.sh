#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, each package's tests in an
# environment holding only that package's declared dependencies, then the
# multi-process integration tests and benchmarks.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
cd "$ROOT"
PACKAGES=(pilot-transport pilot-rpc pilot-worker pilot-checkpoint-sqlite pilot-channels langgraph-pilot)

step() { printf '\n==> %s\n' "$*"; }

step "uv lock --check, sync the full workspace"
"$UV" lock --check
"$UV" sync --frozen --all-packages

step "ruff"
"$UV" run --frozen --no-sync ruff check .
"$UV" run --frozen --no-sync ruff format --check .

step "pyright (strict on packages/*/src)"
"$UV" run --frozen --no-sync pyright

for pkg in "${PACKAGES[@]}"; do
  step "$pkg: tests with only its declared dependencies"
  env_dir="$ROOT/.venvs/$pkg"
  UV_PROJECT_ENVIRONMENT="$env_dir" "$UV" sync --frozen --package "$pkg" --quiet
  UV_PROJECT_ENVIRONMENT="$env_dir" "$UV" run --frozen --no-sync --package "$pkg" \
    pytest "packages/$pkg/tests" -p no:cacheprovider
done

step "integration-tests (real processes, faults, benchmarks)"
"$UV" run --frozen --no-sync pytest integration-tests/tests -p no:cacheprovider
