"""``connector-credentials``: run the operator, or read credentials through its socket.

Only click and the client are imported here: ``get``, ``list`` and ``healthz`` start in a tenth
of a second. ``run`` imports :mod:`connector_credentials.cli.operate` (kopf, boto3, pydantic)
and ``doctor`` :mod:`connector_credentials.cli.doctor` when they are called.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from connector_credentials.client.protocol import DEFAULT_SOCKET_PATH, SOCKET_PATH_ENV


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="connector-credential-operator")
def main() -> None:
    """Serve AWS Secrets Manager credentials to a controller, verified through IRSA."""


@main.command()
@click.option(
    "-A",
    "--all-namespaces",
    "all_namespaces",
    is_flag=True,
    default=None,
    help="Watch ConnectorCredentials in every namespace.",
)
@click.option("-n", "--namespace", "namespaces", multiple=True, metavar="NS", help="Watch this namespace (repeatable).")
@click.option(
    "--standalone",
    is_flag=True,
    default=None,
    help="Accepted for kopf compatibility; the operator never pauses for peers (see docs).",
)
@click.option(
    "-v", "--verbose", is_flag=True, default=None, help="Log at DEBUG (libraries' AWS/HTTP loggers stay quiet)."
)
@click.option("-d", "--debug", is_flag=True, default=None, help="Like --verbose, plus asyncio's own debug output.")
@click.option("--socket-path", default=None, help=f"Unix socket to serve on (default {DEFAULT_SOCKET_PATH}).")
@click.option(
    "--liveness",
    "liveness",
    default=None,
    metavar="URL",
    help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option(
    "--metrics-bind-address",
    "metrics_bind_address",
    default=None,
    metavar="ADDR",
    help="Serve Prometheus metrics at http://ADDR/metrics: host:port or :port (default :8080); 0 turns it off.",
)
def run(**options: Any) -> None:
    """Run the operator and the credential server."""
    from connector_credentials.cli import operate

    operate.run(options)


@main.command("doctor")
@click.option("-A", "--all-namespaces", "all_namespaces", is_flag=True, default=None, help="Check every namespace.")
@click.option("-n", "--namespace", "namespaces", multiple=True, metavar="NS", help="Check this namespace (repeatable).")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Report format."
)
@click.argument("names", nargs=-1, metavar="[NAME]...")
def doctor(names: tuple[str, ...], output: str, **options: Any) -> None:
    """Check the workload identity, AWS, RBAC and each credential, in order; exit 1 if a check fails.

    Namespaces as for `run` (-n, -A, CCRED_NAMESPACE). NAME (or NAMESPACE/NAME): only these credentials.
    """
    from connector_credentials.cli import doctor as checkup
    from connector_credentials.cli.operate import settings_from

    sys.exit(checkup.run(settings_from(options), names, output=output))


def _client(socket_path: str | None) -> Any:
    from connector_credentials.client import CredentialClient

    return CredentialClient(socket_path)


@main.command("get")
@click.argument("ref", metavar="NAMESPACE/NAME")
@click.option("--socket-path", default=None, envvar=SOCKET_PATH_ENV, help="The operator's socket.")
@click.option("--refresh", is_flag=True, help="Read from Secrets Manager now instead of the cached value.")
@click.option("--show", is_flag=True, help="Print the value itself (debugging only).")
@click.option("--watch", "-w", is_flag=True, help="Print it again at each change, until interrupted.")
def get(ref: str, socket_path: str | None, refresh: bool, show: bool, watch: bool) -> None:
    """Print a credential's metadata and its masked value."""
    from connector_credentials.client import CredentialError

    namespace, _, name = ref.partition("/")
    if not namespace or not name:
        raise click.UsageError("give the credential as NAMESPACE/NAME")
    if watch and refresh:
        raise click.UsageError("--watch shows what the operator holds as it changes: it takes no --refresh")
    if watch:
        _watch(socket_path, namespace, name, show)
        return
    try:
        with _client(socket_path) as client:
            credential = client.get(namespace, name, refresh=refresh)
    except CredentialError as exc:
        _print_error(exc)
        sys.exit(_exit_code(exc))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _print_credential(namespace, name, credential, show)


def _watch(socket_path: str | None, namespace: str, name: str, show: bool) -> None:
    """``get --watch``: each change printed as ``get`` prints it; a watch that cannot start exits as
    ``get`` would. Errors after it started (the operator restarting) are printed and waited out."""
    from connector_credentials.client import CredentialError

    try:
        with _client(socket_path) as client, client.watch(namespace, name) as changes:
            for item in changes:
                if not isinstance(item, CredentialError):
                    _print_credential(namespace, name, item, show)
                    continue
                _print_error(item)
                if not changes.started:
                    sys.exit(_exit_code(item))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)  # interrupted, as a shell reports SIGINT


def _print_credential(namespace: str, name: str, credential: Any, show: bool) -> None:
    shown = credential.value if show else _mask(credential.value)
    click.echo(f"name:       {namespace}/{name}")
    click.echo(f"arn:        {credential.arn}")
    click.echo(f"versionId:  {credential.version_id}")
    click.echo(f"fetchedAt:  {credential.fetched_at.isoformat() if credential.fetched_at else '-'}")
    click.echo(f"encoding:   {credential.encoding}")
    click.echo(f"value:      {shown}")


def _print_error(exc: Any) -> None:
    click.echo(f"error: {exc.reason}: {exc.message}", err=True)


def _exit_code(exc: Any) -> int:
    return 2 if exc.status in (404, 403) else 1


@main.command("list")
@click.option("--socket-path", default=None, envvar=SOCKET_PATH_ENV, help="The operator's socket.")
def list_(socket_path: str | None) -> None:
    """List declared credentials and their readiness (never values)."""
    from connector_credentials.client import CredentialError

    try:
        with _client(socket_path) as client:
            infos = client.list()
    except CredentialError as exc:
        click.echo(f"error: {exc.reason}: {exc.message}", err=True)
        sys.exit(1)
    rows = [("NAMESPACE", "NAME", "READY", "REASON", "VERSION")]
    for info in infos:
        rows.append((info.namespace, info.name, str(info.ready), info.reason or "", info.version_id or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.command("healthz")
@click.option("--socket-path", default=None, envvar=SOCKET_PATH_ENV, help="The operator's socket.")
def healthz(socket_path: str | None) -> None:
    """Exit 0 if the operator's socket answers /healthz with 200 (for a startup or exec probe)."""
    from connector_credentials.client import CredentialError

    try:
        with _client(socket_path) as client:
            healthy = client.healthy()
    except (CredentialError, OSError, ValueError) as exc:
        click.echo(f"not healthy: {exc}", err=True)
        sys.exit(1)
    if not healthy:
        click.echo("not healthy: the operator is not watching yet or is shutting down (see its log)", err=True)
        sys.exit(1)
    click.echo("ok")


def _mask(value: str) -> str:
    # Only the length: even a few characters narrow a guess.
    return f"******** ({len(value)} chars; --show prints it)"


if __name__ == "__main__":  # pragma: no cover
    main()
