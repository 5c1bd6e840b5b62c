#!/usr/bin/env bash
# Sets up .venv and runs the main job on the bundled sample (no server needed):
# aggregates into onceflow-output/aggregates.db and prints a summary.
# Extra arguments are passed to the job, e.g. --window=5m.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/onceflow run aggregate "$@"
