"""The command line: one clear line and a non-zero exit on failure, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from cityhealth.cli import app
from cityhealth.config import get_settings


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[CliRunner]:
    monkeypatch.setenv("CITYHEALTH_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_db_upgrade_creates_the_schema(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    tables = set(inspect(create_engine(f"sqlite:///{tmp_path / 'cli.db'}")).get_table_names())
    assert {"resource", "resource_history", "idx_token", "compartment"} <= tables


def test_fhir_install_with_a_bad_spec_fails_cleanly(runner: CliRunner) -> None:
    result = runner.invoke(app, ["fhir", "install", "no-version"])
    assert result.exit_code == 1
    assert "NAME@VERSION" in result.output
    assert "Traceback" not in result.output
