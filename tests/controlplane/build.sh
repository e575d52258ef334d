#!/usr/bin/env bash
# Build the pinned Kubernetes binaries once into a per-user cache and print the directory that
# holds them. Later runs reuse the cache; a change to any pin file (go.mod, go.sum here and in
# tests/localnode/webhook) gives a new directory, so binaries are rebuilt only when pins change.
#
#   build.sh          etcd and kube-apiserver: the control plane of the integration tests and the demo
#   build.sh --node   also kubelet, kube-controller-manager, kube-scheduler, kube-proxy and EKS's IRSA
#                     webhook: the local single-node cluster of tests/localnode (`make cluster`)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
webhook_dir="$here/../localnode/webhook"
if ! command -v go >/dev/null; then
  echo "controlplane: Go is not installed. Install Go >= 1.25 (https://go.dev/dl/ or" >&2
  echo "  'apt-get install golang-1.25'), or run against an existing cluster with KUBECONFIG=..." >&2
  exit 3
fi
node=0
[[ ${1:-} == --node ]] && node=1
kube="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")"
etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$here/go.mod")"
pins="$(cat "$here/go.mod" "$here/go.sum" "$webhook_dir/go.mod" "$webhook_dir/go.sum" | sha256sum | cut -c1-12)"
cache="${CCRED_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/connector-credential-operator/controlplane}"
out="$cache/kube-$kube-etcd-$etcd-$pins"

# name, module directory, package: what each binary is built from.
targets=(
  "etcd $here go.etcd.io/etcd/server/v3"
  "kube-apiserver $here k8s.io/kubernetes/cmd/kube-apiserver"
)
if ((node)); then
  targets+=(
    "kubelet $here k8s.io/kubernetes/cmd/kubelet"
    "kube-controller-manager $here k8s.io/kubernetes/cmd/kube-controller-manager"
    "kube-scheduler $here k8s.io/kubernetes/cmd/kube-scheduler"
    "kube-proxy $here k8s.io/kubernetes/cmd/kube-proxy"
    "amazon-eks-pod-identity-webhook $webhook_dir github.com/aws/amazon-eks-pod-identity-webhook"
  )
fi
missing=()
for target in "${targets[@]}"; do
  read -r name _ _ <<<"$target"
  [[ -x "$out/$name" ]] || missing+=("$target")
done
if ((${#missing[@]} == 0)); then
  echo "$out"
  exit 0
fi

mkdir -p "$out"
# One build at a time per cache: a second caller waits instead of compiling the same thing.
exec 9>"$cache/.build.lock"
flock 9
echo "controlplane: building into $out (k8s.io/kubernetes $kube, etcd $etcd)" >&2
echo "controlplane: a first build downloads modules and compiles for several minutes; later runs reuse it." >&2
start=$SECONDS
export GOFLAGS="-mod=readonly -trimpath" CGO_ENABLED=0
# Stamped as a release build would be: the kubelet and `kubectl version` report it, and the
# API server's version gates (e.g. native sidecars) see a real version, not v0.0.0.
version_flags="-X k8s.io/component-base/version.gitVersion=$kube -X k8s.io/component-base/version.gitMajor=1"
version_flags+=" -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"$kube")"
version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=$kube"
for target in "${missing[@]}"; do
  read -r name module package <<<"$target"
  [[ -x "$out/$name" ]] && continue  # built by a caller we waited for
  (cd "$module" && go build -ldflags="-s -w $version_flags" -o "$out/.$name.tmp" "$package")
  mv "$out/.$name.tmp" "$out/$name"
  echo "controlplane: $name built ($((SECONDS - start)) s so far)" >&2
done
echo "$out"
