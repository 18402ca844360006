"""`cityhealth users`: accounts and OAuth clients from the command line.

Passwords are typed at a hidden prompt (never an option, which shells keep in their history);
a confidential client's secret is printed once and cannot be shown again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from cityhealth.config import get_settings
from cityhealth.db import Database
from cityhealth.security.accounts import Account, Accounts
from cityhealth.security.clients import CONFIDENTIAL
from cityhealth.security.passwords import LoginState, is_locked
from cityhealth.security.roles import ROLES
from cityhealth.security.setup import security_settings

users = typer.Typer(help="Accounts and OAuth clients.", no_args_is_help=True)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@contextmanager
def _accounts() -> Iterator[Accounts]:
    """The service on the configured database, migrated to the current schema."""
    from cityhealth.migrate import upgrade

    settings = get_settings()
    try:
        upgrade(settings.database_url)
    except Exception as error:  # one clear line instead of a traceback
        _fail(f"cannot prepare the database: {error}")
    db = Database(settings.database_url, pool_size=1)
    try:
        yield Accounts(db, security_settings(settings))
    except ValueError as error:  # AccountError, ClientError: the reason, in one line
        _fail(str(error))
    finally:
        db.dispose()


def _new_password() -> str:
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@users.command("create")
def create(
    username: str = typer.Argument(..., help="Login name (case-insensitive)."),
    role: str = typer.Option(..., help=f"One of: {', '.join(ROLES)} (not system)."),
    name: str = typer.Option(..., "--name", help="Display name, e.g. 张伟."),
    fhir_user: str = typer.Option(
        ..., help="The resource the person is: Patient/… or Practitioner/…"
    ),
    organization: str | None = typer.Option(None, help="Organization/… the person acts for."),
    kind: str | None = typer.Option(None, help="Kind of role, e.g. cdc for a regulator."),
) -> None:
    """Create an account (the password is asked for twice, hidden)."""
    password = _new_password()
    with _accounts() as accounts:
        account = accounts.create_account(
            username,
            password,
            role=role,
            display_name=name,
            fhir_user=fhir_user,
            organization=organization,
            role_kind=kind,
        )
    typer.echo(f"account {account.username} ({account.role}) created: {account.id}")


@users.command("passwd")
def passwd(username: str = typer.Argument(..., help="Login name.")) -> None:
    """Set a new password for an account (policy and history apply; ends a lockout)."""
    with _accounts() as accounts:
        account = accounts.account_by_username(username)
        if account is None:
            _fail(f"no account {username!r}")
        accounts.set_password(account.id, _new_password())
    typer.echo(f"password of {account.username} changed")


@users.command("link-guardian")
def link_guardian(
    guardian: str = typer.Argument(..., help="The guardian's login name (a resident)."),
    patient: str = typer.Argument(..., help="The child, e.g. Patient/123."),
) -> None:
    """Let a resident's account act for a child in their care."""
    with _accounts() as accounts:
        account = accounts.account_by_username(guardian)
        if account is None:
            _fail(f"no account {guardian!r}")
        accounts.link_guardian(account.id, patient)
    typer.echo(f"{account.username} now acts for {patient} as guardian")


@users.command("client-create")
def client_create(
    client_id: str = typer.Argument(..., help="The client_id, e.g. his-city-hospital."),
    name: str = typer.Option(..., "--name", help="Name shown on the login page."),
    kind: str = typer.Option(CONFIDENTIAL, help="public (apps, PKCE) or confidential."),
    redirect_uri: list[str] = typer.Option([], help="Exact redirect URI (repeatable)."),
    scope: str = typer.Option(..., help="The most it may be granted, space-separated."),
    role: str | None = typer.Option(None, help="system: it may act on its own."),
    organization: str | None = typer.Option(None, help="Organization/… it belongs to."),
) -> None:
    """Register an OAuth client; a confidential client's secret is printed once."""
    with _accounts() as accounts:
        client, secret = accounts.create_client(
            client_id,
            name=name,
            kind=kind,
            redirect_uris=redirect_uri,
            scopes=scope,
            role=role,
            organization=organization,
        )
    typer.echo(f"client {client.client_id} ({client.kind}) created")
    if secret:
        typer.echo(f"client_secret: {secret}")
        typer.echo("Store it now: it is kept only as a hash and cannot be shown again.")


@users.command("list")
def list_accounts() -> None:
    """List the accounts."""
    with _accounts() as accounts:
        rows = accounts.list_accounts()
        now = accounts.clock()
    table = Table("username", "role", "name", "fhirUser", "organization", "state")
    for account in rows:
        role = ROLES.get(account.role)
        label = f"{account.role} {role.name_zh}" if role else account.role
        if account.role_kind:
            label += f" ({account.role_kind})"
        table.add_row(
            account.username,
            label,
            account.display_name,
            account.fhir_user,
            account.organization or "",
            _state(account, now),
        )
    Console(width=160).print(table)


@users.command("demo")
def demo() -> None:
    """Create one demo account per role (and a hospital system client) and print their
    passwords, which are shown only this once."""
    from cityhealth.fhir.definitions import get_definitions
    from cityhealth.fhir.engine import FhirEngine
    from cityhealth.security.demo_accounts import create_demo_accounts

    with _accounts() as accounts:
        engine = FhirEngine(accounts.db, get_definitions(), get_settings())
        made = create_demo_accounts(engine, accounts)
    table = Table("username", "role", "password / client secret", "fhirUser", "organization")
    for item in made:
        role = ROLES[item.role]
        table.add_row(
            item.username,
            f"{item.role} {role.name_zh}",
            item.secret or "(exists; not shown again)",
            item.fhir_user,
            item.organization or "",
        )
    Console(width=240).print(table)


def _state(account: Account, now: datetime) -> str:
    if not account.active:
        return "inactive"
    locked = is_locked(LoginState(account.failures, account.locked_until), now)
    return "locked" if locked else "active"


audit = typer.Typer(help="The audit trail.", no_args_is_help=True)


@audit.callback()
def audit_commands() -> None:
    """The audit trail."""


@audit.command("verify")
def audit_verify() -> None:
    """Check the audit trail's hash chain; name every altered, removed, reordered or
    slipped-in event and exit 1 if there is any."""
    from cityhealth.security.audit import queued, verify

    with _accounts() as accounts:
        problems = verify(accounts.db)
        waiting = queued(accounts.db)
    for problem in problems:
        where = f"seq {problem.seq}" if problem.seq is not None else "outside the chain"
        typer.echo(f"{where}: {problem.event}: {problem.what}")
    if waiting:
        typer.echo(f"{waiting} events just written wait to be chained (checked once chained)")
    if problems:
        raise typer.Exit(1)
    typer.echo("audit trail intact")


@audit.command("prune")
def audit_prune() -> None:
    """Remove the oldest events whose retention has ended (CITYHEALTH_AUDIT_ACCESS_DAYS for
    records of access, CITYHEALTH_AUDIT_PROCESSING_DAYS for the others); the chain stays
    verifiable from where it now starts."""
    from cityhealth.config import get_settings
    from cityhealth.fhir.clock import now_us
    from cityhealth.security.audit import prune

    settings = get_settings()
    with _accounts() as accounts:
        removed = prune(
            accounts.db, now_us(), settings.audit_access_days, settings.audit_processing_days
        )
    typer.echo(f"{removed} audit events past their retention removed")
