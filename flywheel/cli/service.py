"""``flywheel`` service commands: serve the champion and capture feedback, manage the service's API tokens."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cli._common import console, fail, feedback_store, settings

app = typer.Typer()
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens of the online service.")
app.add_typer(tokens_app, name="tokens")


@app.command()
def serve(
    host: str | None = typer.Option(None, help="default: params serve.host"),
    port: int | None = typer.Option(None, help="default: params serve.port"),
    model_dir: Path | None = typer.Option(None, help="policy folder served while the registry has no champion"),
    registry: bool = typer.Option(True, help="follow the registry's champion alias (hot reload)"),
) -> None:
    """Serve the champion policy and capture feedback (OpenAPI spec at /docs and /openapi.json)."""
    from service.server import config_from_settings, run

    s = settings()
    try:
        config = config_from_settings(s, model_dir, registry)
    except ValueError as exc:
        fail(str(exc))
    run(config, host, port)


@tokens_app.command("create")
def tokens_create(
    scope: list[str] = typer.Option(
        ..., "--scope", help="chat, feedback or admin; repeat it for several (--scope chat --scope feedback)"
    ),
    name: str = typer.Option("", help="who or what the token is for"),
) -> None:
    """Create an API token allowed one or more scopes and print it once (only its SHA-256 is stored)."""
    from service.auth import create_token, normalise_scopes

    try:
        scopes = normalise_scopes(scope)
    except ValueError as exc:
        fail(str(exc))
    with feedback_store() as store:
        token, token_id = create_token(store, scopes, name)
    console.print(f"token {token_id} ({scopes}) created; it is shown only now:")
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The API tokens: public id, scopes, name, creation time (the tokens themselves are not stored)."""
    with feedback_store() as store:
        rows = store.list_tokens()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table("id", "scopes", "name", "created")
    for r in rows:
        table.add_row(r["token_id"], r["scope"], escape(r["name"]), r["created_at"])
    Console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: str = typer.Argument(..., help="the public id shown by `tokens create` / `tokens list`"),
) -> None:
    """Revoke a token: a running service refuses it within a few seconds (serve re-reads tokens every 5 s)."""
    with feedback_store() as store:
        found = store.revoke_token(token_id)
    if not found:
        fail(f"no token with id {token_id!r}; see `flywheel tokens list`")
    console.print(f"token {token_id} revoked")
