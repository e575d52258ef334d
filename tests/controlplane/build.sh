#!/usr/bin/env bash
# Build the pinned kube-apiserver and etcd once into a per-user cache and print the
# directory that holds them. Later runs reuse the cache; a change to go.mod or go.sum
# (the pins) gives a new directory, so the binaries are rebuilt only when pins change.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v go >/dev/null; then
  echo "controlplane: Go is not installed. Install Go >= 1.25 (https://go.dev/dl/ or" >&2
  echo "  'apt-get install golang-1.25'), or run against an existing cluster with KUBECONFIG=..." >&2
  exit 3
fi
kube="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")"
etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$here/go.mod")"
pins="$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-12)"
cache="${CCRED_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/connector-credential-operator/controlplane}"
out="$cache/kube-$kube-etcd-$etcd-$pins"
if [[ -x "$out/kube-apiserver" && -x "$out/etcd" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "controlplane: building kube-apiserver $kube and etcd $etcd into $out" >&2
echo "controlplane: the first build downloads modules and compiles for several minutes;" >&2
echo "  later runs reuse it." >&2
start=$SECONDS
cd "$here"
export GOFLAGS="-mod=readonly -trimpath" CGO_ENABLED=0
go build -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
echo "controlplane: etcd built in $((SECONDS - start)) s" >&2
go build -ldflags="-s -w" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
echo "controlplane: kube-apiserver built in $((SECONDS - start)) s in all" >&2
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
