#!/usr/bin/env bash
# Build the onceflow worker + Flex Template launcher image with docker (BuildKit).
#
#   bash scripts/build_image.sh IMAGE [PIPELINE]     # PIPELINE defaults to aggregate
#
# The Beam version comes from onceflow/versions.py (the one pinned place), read as
# text so no virtual environment is needed. Needs a Docker engine (never run on the
# machines this project is developed on: they have none).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/build_image.sh IMAGE [PIPELINE]" >&2
  exit 2
fi
image=$1
pipeline=${2:-aggregate}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
beam_version=$(python3 -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["BEAM_VERSION"])' \
  "$root/onceflow/versions.py")

cd "$root"
DOCKER_BUILDKIT=1 docker build \
  -f templates/Dockerfile \
  --build-arg "BEAM_VERSION=$beam_version" \
  --build-arg "PIPELINE=$pipeline" \
  -t "$image" \
  .
echo "built $image (Beam $beam_version, pipeline $pipeline)"
