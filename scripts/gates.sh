#!/usr/bin/env bash
# The static gates CI runs before the tests (scripts/test.sh runs this first):
#   ruff          pyflakes, isort, bugbear, dangling asyncio tasks (RUF006), async rules
#   mypy          the whole `epd` package; strict where pyproject.toml says so
#   import-linter the layering contracts in pyproject.toml ([tool.importlinter])
# Each failing gate prints its findings; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CHECKOUT=$PWD

# mypy and import-linter need the installed import tree (epd.workers -> workers/, ...), which an
# editable install only provides through an import hook: link it under a scratch folder.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
"$PYTHON" -P epd/layout.py "$CHECKOUT" "$tree"

failed=()
echo "==> ruff check"
"$PYTHON" -m ruff check --no-cache --output-format concise . || failed+=(ruff)

echo "==> mypy"
# run inside the linked tree; report paths as checkout paths (epd/workers/x.py -> workers/x.py)
(cd "$tree" && "$PYTHON" -m mypy --config-file "$CHECKOUT/pyproject.toml" \
    --cache-dir "$CHECKOUT/.mypy_cache" -p epd) \
  | sed -E 's#^epd/(workers|operator|bench)/#\1/#' || failed+=(mypy)

echo "==> import-linter"
(cd "$tree" && PYTHONPATH="$tree" "$PYTHON" -c "from importlinter.cli import lint_imports_command as c; c()" \
    --config "$CHECKOUT/pyproject.toml" --no-cache) \
  || failed+=(import-linter)

if ((${#failed[@]})); then
  echo "==> static gates FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "==> static gates passed (ruff, mypy, import-linter)"
