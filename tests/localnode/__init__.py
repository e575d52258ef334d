"""A real single-node Kubernetes cluster on this machine, without Docker or a registry.

``make cluster`` / ``make cluster-down`` (``python -m tests.localnode up|down|status``). See
docs/local-cluster.md for how it is put together and how it differs from EKS.
"""
