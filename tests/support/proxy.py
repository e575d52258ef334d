"""Re-export: the harness lives in connector_credentials_demo so that `make demo` shares it."""

from connector_credentials_demo.proxy import *  # noqa: F403
