"""The operator's version: the same as the client distribution's, which the operator pins exactly
(tests/unit/test_distributions.py checks that the pyprojects agree)."""

__version__ = "0.1.0"
