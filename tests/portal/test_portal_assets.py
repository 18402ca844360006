"""Installing htmx: only the pinned tarball is accepted, and a failed install leaves nothing."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityhealth.config import Settings
from cityhealth.portal import assets


def fake_npm(directory: Path, content: bytes) -> None:
    """An `npm` whose `pack` writes a tarball holding `content` as htmx.min.js."""
    tarball = directory / "htmx.org-2.0.11.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("package/dist/htmx.min.js")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    script = directory / "npm"
    answer = json.dumps([{"filename": tarball.name}])
    script.write_text(
        "#!/bin/sh\n"
        "# npm pack SPEC --json --pack-destination DIR\n"
        f'cp "{tarball}" "$5/"\n'
        f"echo '{answer}'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_a_tarball_that_is_not_the_pinned_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm(bin_dir, b"alert('not htmx')")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    settings = Settings(var_dir=tmp_path / "var")
    with pytest.raises(assets.AssetError, match="integrity"):
        assets.install_assets(settings)
    assert not assets.htmx_path(settings).exists()
    assert not assets.htmx_installed(settings)


def test_the_command_reports_a_failure_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm(bin_dir, b"tampered")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(assets, "get_settings", lambda: Settings(var_dir=tmp_path / "var"))
    result = CliRunner().invoke(assets.commands, ["install-assets"])
    assert result.exit_code == 1
    assert "integrity mismatch" in result.output
    assert "Traceback" not in result.output


def test_another_version_counts_as_not_installed(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    path = assets.htmx_path(settings)
    path.parent.mkdir(parents=True)
    path.write_text("/* htmx */")
    assert not assets.htmx_installed(settings)
    (path.parent / "htmx.min.js.spec").write_text("htmx.org@2.0.1\n")
    assert not assets.htmx_installed(settings)
    (path.parent / "htmx.min.js.spec").write_text(assets.HTMX_SPEC + "\n")
    assert assets.htmx_installed(settings)
