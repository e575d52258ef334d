"""Local emulators for the demo and the tests: a Kubernetes API (kmock), AWS (moto), a fault proxy.

Needs the ``demo`` extra (``pip install '.[demo]'``); the operator never imports this package.
"""
