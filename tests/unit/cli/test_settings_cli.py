import os

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from connector_credentials.cli.main import main
from connector_credentials.config.settings import OperatorSettings


def test_environment_settings_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_NAMESPACE", "team-a, team-b")
    monkeypatch.setenv("CCRED_ALLOWED_UIDS", "1000,10001")
    monkeypatch.setenv("CCRED_SOCKET_MODE", "0640")
    monkeypatch.setenv("CCRED_DEFAULT_REFRESH_INTERVAL", "1h30m")
    monkeypatch.setenv("CCRED_MAX_STALENESS", "600")
    settings = OperatorSettings()
    assert settings.namespace == ["team-a", "team-b"]
    assert settings.allowed_uids == [1000, 10001]
    assert settings.socket_mode == 0o640
    assert settings.default_refresh_interval == 5400
    assert settings.max_staleness == 600


def test_defaults() -> None:
    settings = OperatorSettings()
    assert settings.allowed_uids == [os.getuid()]
    assert settings.socket_mode == 0o660
    assert settings.socket_path == "/var/run/connector-credentials/credentials.sock"
    assert (settings.default_refresh_interval, settings.max_staleness) == (300, 900)
    assert settings.allow_non_irsa_credentials is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CCRED_SOCKET_MODE", "0666", "'other' bits"),
        ("CCRED_SOCKET_MODE", "4770", "not a plain permission mode"),
        ("CCRED_DEFAULT_REFRESH_INTERVAL", "1s", "at least 5s"),
        ("CCRED_ALLOWED_UIDS", "root", "allowed_uids"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        OperatorSettings()


@pytest.mark.parametrize(
    "name",
    [
        "CCRED_DEFAULT_REFRESH_INTERVAL",
        "CCRED_MAX_STALENESS",
        "CCRED_BACKOFF_CAP",
        "CCRED_HEADER_TIMEOUT",
        "CCRED_WATCH_HEARTBEAT",
    ],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_durations_that_are_not_finite_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """#17 defect 9: accepted before, after which every check failed."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CCRED_").lower()):
        OperatorSettings()


def test_the_watch_heartbeat_is_a_duration_of_at_most_thirty_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorSettings().watch_heartbeat == 30.0
    for value, seconds in (("500ms", 0.5), ("2.5", 2.5), ("30s", 30.0)):
        monkeypatch.setenv("CCRED_WATCH_HEARTBEAT", value)
        assert OperatorSettings().watch_heartbeat == seconds
    for value in ("31s", "1m", "0", "-1", "soon"):
        monkeypatch.setenv("CCRED_WATCH_HEARTBEAT", value)
        with pytest.raises(ValidationError, match="watch_heartbeat"):
            OperatorSettings()


def test_run_refuses_a_duration_that_is_not_finite_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_DEFAULT_REFRESH_INTERVAL", "nan")
    result = CliRunner().invoke(main, ["run", "-n", "x"])
    assert result.exit_code == 2
    assert "default_refresh_interval" in result.output.lower()


def test_run_refuses_bad_settings_with_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_SOCKET_MODE", "0666")
    result = CliRunner().invoke(main, ["run", "-n", "x"])
    assert result.exit_code == 2
    assert "'other' bits" in result.output


def test_run_refuses_both_namespace_modes() -> None:
    result = CliRunner().invoke(main, ["run", "-A", "-n", "x"])
    assert result.exit_code == 2
    assert "either --all-namespaces or --namespace" in result.output


def test_all_namespaces_on_the_command_line_outweighs_the_namespace_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from connector_credentials.cli.operate import settings_from

    monkeypatch.setenv("CCRED_NAMESPACE", "xpander")  # as the shipped sidecar sets it
    assert settings_from({"all_namespaces": True, "namespaces": ()}).watched_namespaces() is None
    assert settings_from({"all_namespaces": None, "namespaces": ()}).watched_namespaces() == ["xpander"]
    assert settings_from({"all_namespaces": None, "namespaces": ("team-a",)}).watched_namespaces() == ["team-a"]
    result = CliRunner().invoke(main, ["doctor", "-A", "-n", "team-a"])
    assert result.exit_code == 2 and "not both" in result.output


def test_get_needs_namespace_slash_name() -> None:
    result = CliRunner().invoke(main, ["get", "just-a-name", "--socket-path", "/nonexistent.sock"])
    assert result.exit_code == 2
    assert "NAMESPACE/NAME" in result.output


def test_get_explains_a_missing_socket() -> None:
    result = CliRunner().invoke(main, ["get", "ns/name", "--socket-path", "/nonexistent/c.sock"])
    assert result.exit_code == 1
    assert "/nonexistent/c.sock" in result.output


def test_backoff_settings_take_units_or_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCRED_BACKOFF_CAP", "2m")
    monkeypatch.setenv("CCRED_BACKOFF_BASE", "0.5")
    monkeypatch.setenv("CCRED_SERVE_WAIT", "500ms")
    settings = OperatorSettings()
    assert (settings.backoff_cap, settings.backoff_base, settings.serve_wait) == (120, 0.5, 0.5)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://0.0.0.0:8080/healthz", ("0.0.0.0", 8080)),
        ("http://127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("http://[::1]:8080/healthz", ("::1", 8080)),
        ("http:///healthz", ("localhost", 80)),  # as kopf reads it
    ],
)
def test_the_liveness_address_is_read_as_kopf_reads_it(url: str, address: tuple[str, int]) -> None:
    from connector_credentials.cli.operate import liveness_address

    assert liveness_address(url) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://0.0.0.0:8080/healthz", "only http:// URLs"),
        ("0.0.0.0:8080", "only http:// URLs"),
        ("http://0.0.0.0:port/healthz", "is not a URL"),
        ("http://0.0.0.0:70000/healthz", "is not a URL"),
    ],
)
def test_a_liveness_url_kopf_cannot_serve_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    # kopf would raise on it with a traceback once the CRD is served; here it stops the start, in one line.
    monkeypatch.setenv("CCRED_METRICS_BIND_ADDRESS", "0")
    result = CliRunner().invoke(main, ["run", "--liveness", url])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
