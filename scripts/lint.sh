#!/usr/bin/env bash
# The checks scripts/test.sh (so .ci/run) runs before pytest, a few seconds in all: the formatter
# and the linter with import sorting (ruff, configured in pyproject.toml), mypy on the public
# plugin module and the roles ([tool.mypy]), shellcheck on the shell scripts, and the GitHub
# Actions workflows checked with actionlint's checks (jactionlint's "correctness" profile), since
# no runner can run them here. Every check runs; the exit status is 1 if any failed.
#   scripts/lint.sh          check only
#   scripts/lint.sh --fix    first apply the linter's safe fixes and the formatter, then check
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
case "${1:-}" in
  "") ;;
  --fix)
    "$bin/ruff" check --fix-only --quiet .
    "$bin/ruff" format --quiet .
    ;;
  *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
esac
failed=()
run() {  # run one check; remember its name if it fails
  local name=$1; shift
  "$@" || failed+=("$name")
}
# One line per file to reformat (`ruff format --diff` shows how; `scripts/lint.sh --fix` does it).
run "ruff format" "$bin/ruff" format --check --quiet --output-format concise .
run "ruff check" "$bin/ruff" check --quiet .
run mypy "$bin/python" -m mypy
run shellcheck "$bin/shellcheck" scripts/*.sh .ci/run
run actionlint "$bin/jactionlint" --profile correctness --shellcheck "$bin/shellcheck" --ruff "$bin/ruff" \
  .github/workflows/*.yml
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'lint failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "lint: ruff format, ruff check, mypy, shellcheck and actionlint passed" >&2
