"""Unit tests of the adapters, each against stubs of its own world (botocore's Stubber, a local HTTP server)."""
