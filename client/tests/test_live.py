"""The client distribution alone, against a live operator: run with the standard library's unittest
in a virtual environment where only the client wheel is installed (tests/integration/test_client_wheel.py
builds that environment, starts the operator and runs this file).

Any import of a module outside the standard library fails here, before and after the client is
imported: the client must work where only Python is installed.

Environment: ``CCRED_SOCKET_PATH`` (the live socket), ``CCRED_TEST_NAMESPACE``, and
``CCRED_TEST_EXPECT``: JSON ``{name: sha256 of the value's bytes}`` for credentials that must read,
``{name: "!Reason"}`` for those that must fail with that reason.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import json
import os
import sys
import sysconfig
import unittest

#: The standard library, the client's namespace, and what running this file itself brings.
ALLOWED = set(sys.stdlib_module_names) | {"connector_credentials", "__main__", "test_live"}


def _allowed(name: str) -> bool:
    top = name.split(".", maxsplit=1)[0]
    # _sysconfigdata_*: the interpreter's build settings, a standard module with a per-platform name.
    return top in ALLOWED or top.startswith("_sysconfigdata_")


class _StdlibOnly(importlib.abc.MetaPathFinder):
    """Refuses to find any top-level module outside the standard library (and the client's namespace)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if not _allowed(fullname):
            raise ImportError(f"{fullname} is not in the standard library: the client may not import it")


#: What the interpreter loaded before the client (site hooks such as setuptools' _distutils_hack).
LOADED_BEFORE = set(sys.modules)
sys.meta_path.insert(0, _StdlibOnly())

from connector_credentials import client  # after the guard, on purpose
from connector_credentials.client import CredentialClient, CredentialError, protocol


class TheWheelAlone(unittest.TestCase):
    def test_it_is_the_installed_wheel(self) -> None:
        site = sysconfig.get_paths()["purelib"]
        self.assertTrue(client.__file__.startswith(site), client.__file__)

    def test_nothing_outside_the_standard_library_is_loaded(self) -> None:
        foreign = sorted(name for name in set(sys.modules) - LOADED_BEFORE if not _allowed(name))
        self.assertEqual(foreign, [])

    def test_the_contract_ships_with_it(self) -> None:
        from importlib import resources

        document = json.loads(resources.files(client).joinpath("openapi.json").read_text("utf-8"))
        self.assertEqual(document["openapi"], "3.1.0")
        self.assertIn(protocol.CREDENTIALS_PATH + "/{namespace}/{name}", document["paths"])
        self.assertIn(protocol.HEALTHZ_PATH, document["paths"])
        self.assertTrue(resources.files(client).joinpath("py.typed").is_file())


class AgainstTheLiveOperator(unittest.TestCase):
    def setUp(self) -> None:
        self.namespace = os.environ["CCRED_TEST_NAMESPACE"]
        self.expect: dict[str, str] = json.loads(os.environ["CCRED_TEST_EXPECT"])

    def test_healthy(self) -> None:
        with CredentialClient() as reader:  # CCRED_SOCKET_PATH
            self.assertTrue(reader.healthy())

    def test_reads_and_refusals(self) -> None:
        with CredentialClient() as reader:
            for name, want in self.expect.items():
                with self.subTest(name=name):
                    if want.startswith("!"):
                        with self.assertRaises(CredentialError) as caught:
                            reader.get(self.namespace, name)
                        self.assertEqual(caught.exception.reason, want[1:])
                    else:
                        credential = reader.get(self.namespace, name, refresh=True)
                        self.assertEqual(hashlib.sha256(credential.as_bytes()).hexdigest(), want)
                        self.assertNotIn(credential.value, repr(credential))

    def test_watch(self) -> None:
        """Each credential's first item, as get would return or raise it, through the stream alone."""
        with CredentialClient() as reader:
            for name, want in self.expect.items():
                with self.subTest(name=name), reader.watch(self.namespace, name) as changes:
                    item = next(changes)
                    self.assertTrue(changes.started)
                    if want.startswith("!"):
                        self.assertIsInstance(item, CredentialError)
                        self.assertEqual(item.reason, want[1:])
                    else:
                        self.assertNotIsInstance(item, CredentialError)
                        self.assertEqual(hashlib.sha256(item.as_bytes()).hexdigest(), want)

    def test_list(self) -> None:
        with CredentialClient() as reader:
            names = {info.name for info in reader.list() if info.namespace == self.namespace}
        self.assertEqual(names, set(self.expect))


if __name__ == "__main__":
    unittest.main()
