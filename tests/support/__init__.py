"""Test support. The emulators, the AWS fault-injecting proxy and the process runner live in
``connector_credentials_demo`` (installed with the ``demo`` extra) so that ``make demo`` uses
the very same harness; these modules re-export them under the tests' tree."""
