//go:build tools

// Package tools pins EKS's own IRSA mutating webhook, which the local cluster
// (tests/localnode) runs as a process, registered with a MutatingWebhookConfiguration,
// exactly as EKS wires IRSA. A module of its own: its Kubernetes libraries are older
// than the control plane's and must not move those pins.
package tools

import _ "github.com/aws/amazon-eks-pod-identity-webhook"
