#!/usr/bin/env bash
# The test command (README, .ci/run): sets everything up, then runs the whole suite.
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
set +u; . "$REPO/env.sh"; set -u
cd "$REPO"
set +e
pytest -p no:cacheprovider -q -rs "$REPO/test" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
