#!/usr/bin/env bash
# Creates .venv (if needed) and installs onceflow into it, editable.
#   bash scripts/bootstrap.sh          # the package and its core dependencies
#   bash scripts/bootstrap.sh dev      # plus everything the tests need
# Re-running is cheap: it reinstalls only when setup.py or the extra changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "onceflow needs Python 3.11 or newer; set PYTHON=/path/to/python3.1x" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.onceflow-installed"
want="$(cat setup.py onceflow/versions.py | sha256sum | cut -c1-16) $spec"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  echo "installing onceflow $spec into .venv (first time takes a minute)"
  .venv/bin/python -m pip install --quiet -e "$spec"
  echo "$want" >> "$stamp"
fi
