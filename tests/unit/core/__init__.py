"""Unit tests of the core, with the fakes of tests/support/fakes.py instead of AWS and Kubernetes."""
