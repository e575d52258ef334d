"""Test and demo support, never installed: a real control plane (etcd + kube-apiserver built
from pinned Go modules), moto for AWS, fault-injecting proxies in front of both, and a runner
for the operator's console script. ``make demo`` (``python -m tests.support.demo``) uses the
very same harness."""
