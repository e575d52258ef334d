#!/usr/bin/env bash
# End-to-end tests in real pods; `make e2e` runs this.
#
# By default on the local single-node cluster of tests/localnode (root, no Docker): started here
# when none runs and stopped afterwards; one that was already running (`make cluster`) is used and
# left as it was. Where it cannot start (no root, no cgroups, missing packages), the run fails
# with the reason under CI (CI=true or E2E_REQUIRE=1) and skips with it elsewhere.
#
#   E2E_CLUSTER=kind       use a kind cluster instead (needs Docker and kind; see tests/e2e/clusters.py)
#   E2E_KEEP_CLUSTER=1     keep a cluster this run started, for a look afterwards
#   PYTHON=...             interpreter with the test extras (default .venv/bin/python)
# Extra arguments go to pytest, e.g.  tests/e2e/run.sh -k sidecar -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
cluster=${E2E_CLUSTER:-localnode}

skip_or_fail() {
  if [[ ${CI:-} == true || ${E2E_REQUIRE:-0} == 1 ]]; then
    echo "e2e: FAILED: the $cluster cluster cannot run here: $*" >&2
    exit 1
  fi
  echo "e2e: SKIPPED: the $cluster cluster cannot run here: $*" >&2
  exit 0
}

if [[ $cluster == kind ]]; then
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || skip_or_fail "'$tool' is not on PATH"
  done
  docker info >/dev/null 2>&1 || skip_or_fail "'docker info' failed (no Docker engine)"
  export E2E=1 E2E_CLUSTER=kind
  exec "$python" -m pytest tests/e2e -p no:cacheprovider "$@"
fi

if ! why=$("$python" -m tests.localnode check 2>&1); then
  skip_or_fail "${why#localnode: }"
fi
started=0
if ! "$python" -m tests.localnode status >/dev/null 2>&1; then
  started=1
  stop() {
    local status=$?
    if [[ ${E2E_KEEP_CLUSTER:-0} == 1 ]]; then
      echo "e2e: kept the local cluster: make cluster-down when done" >&2
    else
      "$python" -m tests.localnode down || status=1
    fi
    exit "$status"
  }
  trap stop EXIT
  "$python" -m tests.localnode up >/dev/null
fi
export E2E=1 E2E_CLUSTER=localnode
# Set inside the test process from the cluster's state, so a KUBECONFIG of yours is never used.
unset KUBECONFIG
"$python" -m pytest tests/e2e -p no:cacheprovider "$@"
