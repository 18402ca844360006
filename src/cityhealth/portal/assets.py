"""The portal's static assets: its stylesheet, shipped in the package, and htmx, fetched at
install time from the npm registry, checked against the pinned sha512 and served from the var
directory. No page loads anything from another site; every page also works without htmx.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tarfile
import tempfile
from pathlib import Path

import typer

from cityhealth.config import Settings, get_settings
from cityhealth.fhir.packages import PackageError, npm_pack

#: htmx (BSD-2-Clause) as published on the npm registry, pinned by the sha512 of its tarball.
HTMX_SPEC = "htmx.org@2.0.11"
HTMX_INTEGRITY = (
    "sha512-"
    "Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA=="
)
_HTMX_MEMBER = "package/dist/htmx.min.js"
#: The package's own files: stylesheet and templates.
PACKAGE_STATIC = Path(__file__).with_name("static")
HTMX_URL = "/static/vendor/htmx.min.js"


class AssetError(Exception):
    """An asset could not be fetched or did not match its pin."""


def vendor_dir(settings: Settings) -> Path:
    """Where fetched assets live, served at /static/vendor/."""
    return settings.var_dir / "static" / "vendor"


def htmx_path(settings: Settings) -> Path:
    return vendor_dir(settings) / "htmx.min.js"


def _marker(settings: Settings) -> Path:
    return vendor_dir(settings) / "htmx.min.js.spec"


def htmx_installed(settings: Settings) -> bool:
    """True when the pinned htmx is in place (a different version counts as absent)."""
    marker = _marker(settings)
    return (
        htmx_path(settings).is_file()
        and marker.is_file()
        and marker.read_text(encoding="utf-8").strip() == HTMX_SPEC
    )


def install_assets(settings: Settings, force: bool = False) -> Path:
    """Fetch the pinned htmx with `npm pack`, verify its sha512 and install it; idempotent."""
    target = htmx_path(settings)
    if htmx_installed(settings) and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tarball, _integrity = npm_pack(HTMX_SPEC, Path(tmp))
        except PackageError as error:
            raise AssetError(str(error)) from None
        content = _checked_member(tarball)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replace atomically: a server running meanwhile serves the old file or the new one.
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    staging.write_bytes(content)
    os.replace(staging, target)
    _marker(settings).write_text(HTMX_SPEC + "\n", encoding="utf-8")
    return target


def _checked_member(tarball: Path) -> bytes:
    data = tarball.read_bytes()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != HTMX_INTEGRITY:
        raise AssetError(f"{HTMX_SPEC}: sha512 integrity mismatch ({digest})")
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(_HTMX_MEMBER)
        if member is None:
            raise AssetError(f"{HTMX_SPEC} has no {_HTMX_MEMBER}")
        return member.read()


#: `cityhealth portal …`: app.add_typer(commands, name="portal").
commands = typer.Typer(no_args_is_help=True)


@commands.callback()
def portal_commands() -> None:
    """The residents' and staff portal."""


@commands.command("install-assets")
def install_assets_command(
    force: bool = typer.Option(False, help="Fetch again even if installed."),
) -> None:
    """Fetch htmx from the npm registry, check its pinned sha512, install it under var/."""
    try:
        path = install_assets(get_settings(), force=force)
    except AssetError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{HTMX_SPEC} installed in {path}")
