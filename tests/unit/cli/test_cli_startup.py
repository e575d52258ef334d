"""``connector-credentials get|list|healthz`` start fast: the command line imports the heavy
libraries only inside ``run`` and ``doctor`` (a ``get`` took 0.5-1 s when it imported kopf)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("kopf", "boto3", "botocore", "pydantic", "pydantic_settings", "aiohttp", "prometheus_client")


def _loaded_after(program: str) -> list[str]:
    probe = f"{program}\nimport sys, json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_command_line_imports_no_heavy_library() -> None:
    assert _loaded_after("import connector_credentials.cli.main") == []


def test_get_list_and_healthz_import_no_heavy_library() -> None:
    for command in (["get", "default/x"], ["list"], ["healthz"]):
        program = (
            "import sys\n"
            "from connector_credentials.cli.main import main\n"
            "try:\n"
            f"    main([*{command!r}, '--socket-path', '/nonexistent/ccred.sock'], prog_name='connector-credentials')\n"
            "except SystemExit:\n"
            "    pass\n"
        )
        assert _loaded_after(program) == [], command


def test_run_still_imports_the_operator() -> None:
    """The lazy import is real: ``run``'s module brings kopf and pydantic in."""
    assert {"kopf", "pydantic"} <= set(_loaded_after("import connector_credentials.cli.operate"))
