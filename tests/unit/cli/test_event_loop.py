"""CCRED_EVENT_LOOP: its parsing, the loop ``run`` starts for each value, and uvloop required but missing."""

import asyncio
import subprocess
import sys
from typing import Any

import pytest
import uvloop
from click.testing import CliRunner
from pydantic import ValidationError

from connector_credentials.cli import operate as cli
from connector_credentials.cli.main import main as cli_main
from connector_credentials.config.settings import OperatorSettings


def test_the_default_is_auto() -> None:
    assert OperatorSettings().event_loop == "auto"


@pytest.mark.parametrize(("given", "parsed"), [("auto", "auto"), ("asyncio", "asyncio"), (" UVLoop ", "uvloop")])
def test_values_are_parsed_case_insensitively(monkeypatch: pytest.MonkeyPatch, given: str, parsed: str) -> None:
    monkeypatch.setenv("CCRED_EVENT_LOOP", given)
    assert OperatorSettings().event_loop == parsed


def test_an_unknown_loop_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="'auto', 'asyncio' or 'uvloop'"):
        OperatorSettings()
    result = CliRunner().invoke(cli_main, ["run", "-n", "x"])
    assert result.exit_code == 2
    assert "invalid settings: event_loop" in result.output


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``run`` up to its event loop: what ``_run`` saw instead of starting the operator."""
    seen: list[tuple[str, str]] = []

    async def fake_run(_settings: OperatorSettings, why: str) -> None:
        seen.append((cli._loop_name(), why))
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == seen[-1][0].startswith("uvloop")

    monkeypatch.setattr(cli, "_run", fake_run)
    return seen


@pytest.mark.parametrize(
    ("value", "name", "why"),
    [
        (None, f"uvloop {uvloop.__version__}", "CCRED_EVENT_LOOP=auto"),
        ("auto", f"uvloop {uvloop.__version__}", "CCRED_EVENT_LOOP=auto"),
        ("uvloop", f"uvloop {uvloop.__version__}", "CCRED_EVENT_LOOP=uvloop"),
        ("asyncio", "the standard asyncio event loop", "CCRED_EVENT_LOOP=asyncio"),
    ],
)
def test_run_starts_the_loop_asked_for(
    monkeypatch: pytest.MonkeyPatch, started: list[tuple[str, str]], value: str | None, name: str, why: str
) -> None:
    if value is not None:
        monkeypatch.setenv("CCRED_EVENT_LOOP", value)
    result = CliRunner().invoke(cli_main, ["run", "-n", "x"])
    assert result.exit_code == 0, result.output
    assert started == [(name, why)]


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError, as if not installed


def test_auto_without_uvloop_runs_the_standard_loop(
    monkeypatch: pytest.MonkeyPatch, started: list[tuple[str, str]]
) -> None:
    _without_uvloop(monkeypatch)
    result = CliRunner().invoke(cli_main, ["run", "-n", "x"])
    assert result.exit_code == 0, result.output
    assert started == [("the standard asyncio event loop", "CCRED_EVENT_LOOP=auto: uvloop is not installed")]


def test_uvloop_required_but_missing_is_an_error_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, started: list[tuple[str, str]]
) -> None:
    _without_uvloop(monkeypatch)
    monkeypatch.setenv("CCRED_EVENT_LOOP", "uvloop")
    with pytest.raises(cli.LoopUnavailable):
        cli.event_loop("uvloop")
    result = CliRunner().invoke(cli_main, ["run", "-n", "x"])
    assert result.exit_code == 2
    assert "CCRED_EVENT_LOOP=uvloop, but uvloop is not installed" in result.output
    assert "connector-credential-operator[uvloop]" in result.output
    assert started == []


def test_uvloop_required_but_missing_exits_2_in_a_real_process(tmp_path: Any) -> None:
    """The same as a process: an interpreter whose ``import uvloop`` fails, the real entry point."""
    program = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from connector_credentials.cli.main import main\n"
        "main(['run', '-n', 'x'], prog_name='connector-credentials')\n"
    )
    env = {"CCRED_EVENT_LOOP": "uvloop", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: CCRED_EVENT_LOOP=uvloop, but uvloop is not installed"), proc.stderr
    assert "Traceback" not in proc.stderr
