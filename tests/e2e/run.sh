#!/usr/bin/env bash
# End-to-end tests on a throwaway kind cluster; `make e2e` runs this.
#
# Creates the kind cluster (kubeconfig in a temp file: your ~/.kube/config is untouched),
# runs `pytest -m e2e tests/e2e` (which builds and loads the images, installs
# tests/e2e/overlay = deploy/ + fake AWS, applies deploy/samples and checks them), then
# deletes the cluster.
#
#   E2E_KIND_CLUSTER=name   cluster name (default ccred-e2e); an existing one is reused and kept
#   E2E_KEEP_CLUSTER=1      keep the cluster (and the install) for a look afterwards
#   E2E_SKIP_BUILD=1        reuse the images built by a previous run
#   E2E_REQUIRE=1           fail instead of skipping when Docker/kind/kubectl are missing (CI)
#   PYTHON=...              interpreter with the test extras (default .venv/bin/python)
# Extra arguments go to pytest, e.g.  tests/e2e/run.sh -k socket -x
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
cluster=${E2E_KIND_CLUSTER:-ccred-e2e}
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3

skip() {
  echo "e2e: SKIPPED: $*" >&2
  if [[ ${E2E_REQUIRE:-0} == 1 ]]; then exit 1; fi
  exit 0
}

problems=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || problems+=("'$tool' is not on PATH")
done
if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  problems+=("'docker info' failed (the Docker engine is not running, or $(id -un) may not use it)")
fi
if ((${#problems[@]})); then
  skip "$(IFS=';'; echo "${problems[*]}" | sed 's/;/; /g'). The e2e tests need Docker" \
       "(https://docs.docker.com/engine/install/), kind (https://kind.sigs.k8s.io/) and kubectl."
fi

kubeconfig=$(mktemp "${TMPDIR:-/tmp}/ccred-e2e-kubeconfig.XXXXXX")
created=0
cleanup() {
  local status=$?
  if [[ $created == 1 && ${E2E_KEEP_CLUSTER:-0} != 1 ]]; then
    echo "e2e: deleting kind cluster $cluster" >&2
    kind delete cluster --name "$cluster" --kubeconfig "$kubeconfig" || true
  elif [[ $created == 1 ]]; then
    echo "e2e: kept kind cluster $cluster: kind export kubeconfig --name $cluster" >&2
  fi
  rm -f "$kubeconfig"
  exit "$status"
}
trap cleanup EXIT

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  echo "e2e: reusing kind cluster $cluster" >&2
  kind export kubeconfig --name "$cluster" --kubeconfig "$kubeconfig"
else
  echo "e2e: creating kind cluster $cluster" >&2
  created=1
  kind create cluster --name "$cluster" --kubeconfig "$kubeconfig" --wait 180s
fi

export KUBECONFIG=$kubeconfig E2E=1 E2E_KIND_CLUSTER=$cluster
"$python" -m pytest -m e2e tests/e2e -p no:cacheprovider "$@"
