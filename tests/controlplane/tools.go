//go:build tools

// Package tools names the main packages build.sh compiles, so that `go mod tidy`
// keeps every module they need in go.sum. etcd and kube-apiserver are the control plane
// the integration tests and the demo run; the other three complete the local
// single-node cluster of tests/localnode (`make cluster`, `make e2e`).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
