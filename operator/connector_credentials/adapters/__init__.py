"""The adapters: the core's ports over real I/O. One subpackage per outside world, and none imports
another (``.importlinter`` declares the contract):

* ``aws``: Secrets Manager and STS with boto3 (the only place boto3 and botocore are imported,
  besides the command line);
* ``kube``: the Kubernetes API (status, events, listing) and kopf's handlers;
* ``socket``: the credential socket (aiohttp over a Unix socket, peer credentials);
* ``metrics``: Prometheus metrics and their HTTP endpoint.

May import: ``core``, ``config``, ``api``, the client's ``protocol``, and their own libraries.
"""
