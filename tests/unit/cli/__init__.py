"""Unit tests of the command line: settings, the event loop, doctor's findings, log redaction, start-up cost."""
