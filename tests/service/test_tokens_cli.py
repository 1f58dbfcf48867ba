"""``flywheel tokens`` in-process: a token may hold several scopes (listed, and allowed by the service), and no
single-value option of the CLI may be repeated (typer/click would keep the last value and drop the others)."""

from __future__ import annotations

import json

import pytest
from svc_helpers import workspace
from typer.main import get_command
from typer.testing import CliRunner

from flywheel import cli
from service.auth import Principal
from service.store import FeedbackStore


@pytest.fixture
def ws(tmp_path, monkeypatch):
    ws = workspace(tmp_path)
    monkeypatch.setenv("FLYWHEEL_ROOT", str(ws))
    monkeypatch.delenv("FLYWHEEL_FEEDBACK_STORE", raising=False)
    return ws


def _run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_a_token_keeps_every_scope_it_was_created_with(ws):
    created = _run("tokens", "create", "--scope", "chat", "--scope", "feedback", "--name", "web")
    assert created.exit_code == 0, created.output
    listed = _run("tokens", "list", "--json")
    (row,) = json.loads(listed.stdout)
    assert row["scopes"] == ["chat", "feedback"] and row["scope"] == "chat,feedback"
    table = _run("tokens", "list").stdout
    assert "chat,feedback" in table
    store = FeedbackStore(f"sqlite:///{ws / 'feedback.db'}")
    try:
        ((token_id, scope),) = store.tokens().values()
    finally:
        store.close()
    principal = Principal(token_id, scope)
    assert principal.allows("chat") and principal.allows("feedback") and not principal.allows("admin")


def test_admin_subsumes_other_scopes_and_unknown_scopes_fail(ws):
    assert _run("tokens", "create", "--scope", "feedback", "--scope", "admin").exit_code == 0
    assert json.loads(_run("tokens", "list", "--json").stdout)[0]["scopes"] == ["admin"]
    bad = _run("tokens", "create", "--scope", "chat", "--scope", "root")
    assert bad.exit_code == 2 and "unknown scope 'root'" in bad.output


@pytest.mark.parametrize(
    "args, option",
    [
        (["tokens", "create", "--scope", "chat", "--name", "a", "--name", "b"], "--name"),
        (["ingest", "events.jsonl", "--format", "native", "--format=hh-rlhf"], "--format"),
        (["export", "--track", "--no-track"], "--track/--no-track"),
        (["quarantine", "purge", "--older-than", "1", "--older-than", "30"], "--older-than"),
        (["erase", "--user-id", "u-1", "--user-id", "u-2"], "--user-id"),
    ],
)
def test_a_repeated_single_value_option_is_an_error_and_nothing_runs(ws, args, option):
    result = _run(*args)
    assert result.exit_code == 2
    assert f"option {option} given twice" in result.output
    assert not (ws / "feedback.db").exists()  # refused before the command ran


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def _single_value_options():
    for path, cmd in _commands(get_command(cli.app)):
        for p in cmd.params:
            if p.param_type_name == "option" and not p.multiple and not p.count and p.name != "help":
                yield pytest.param(path, p, id=" ".join([*path, p.opts[0]]))


@pytest.mark.parametrize("path, option", list(_single_value_options()))
def test_every_single_value_option_of_every_command_refuses_repetition(path, option):
    """Covers options added later too: whatever the command, giving one of its scalar options twice is caught."""
    given = [option.opts[0]] if option.is_flag else [option.opts[0], "1"]
    root = get_command(cli.app)
    ctx = root.make_context("flywheel", [*path, *given, *given], resilient_parsing=True)
    assert cli._repeated_option(ctx) == "/".join([*option.opts, *option.secondary_opts])
    ctx = root.make_context("flywheel", [*path, *given], resilient_parsing=True)
    assert cli._repeated_option(ctx) is None
