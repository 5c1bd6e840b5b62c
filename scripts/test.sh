#!/usr/bin/env bash
# Sets up .venv with the test dependencies, starts the local services the tests
# use (Kafka, PostgreSQL, Prism, Flink: see `onceflow dev`), and runs every test.
# Services this script started are stopped at the end; ones already up are kept.
# Extra arguments go to pytest, e.g. -k dedup or -m "not slow". The tests run in
# ONCEFLOW_TEST_WORKERS processes (pytest-xdist, default 2; 0 runs them in this
# one): the tests that restart the broker alone, those of the JVM services in one
# worker (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export PATH="$PWD/.venv/bin:$PATH"
services="${ONCEFLOW_TEST_SERVICES:-kafka,postgres,prism,flink}"

healthy_services() {
  onceflow dev status --json | python -c '
import json, sys
print(",".join(name for name, state in json.load(sys.stdin).items() if state.get("healthy")))'
}
already_up="$(healthy_services)"
stop_what_we_started() {
  # Everything up now that was not up before: the services started here and any a
  # test started on its own (prism is a binary, nothing to stop).
  local now started=""
  now="$(healthy_services)"
  for service in ${now//,/ }; do
    case ",$already_up,prism," in *",$service,"*) ;; *) started="$started,$service" ;; esac
  done
  started="${started#,}"
  if [ -n "$started" ]; then onceflow dev down --services "$started" || true; fi
}
trap stop_what_we_started EXIT
# A broker started here gets the secured listeners too (SASL_SSL, mutual TLS) that
# the secured-listener tests use; one already running is left as it is.
secure=""
case ",$already_up," in *",kafka,"*) ;; *) secure="--secure" ;; esac
onceflow dev up --services "$services" $secure
workers="${ONCEFLOW_TEST_WORKERS:-2}"
python -m pytest -n "$workers" --dist loadgroup "$@"
