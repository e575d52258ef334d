"""Unit tests of the client against stand-in servers (the live operator is in tests/integration)."""
