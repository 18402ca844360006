"""The portal on each database backend, with its own settings, keys and clock."""

from __future__ import annotations

import pytest
from portal_helpers import PortalEnv, build_env

from cityhealth.db import Database
from cityhealth.fhir.definitions import Definitions


@pytest.fixture(scope="module")
def env(
    database: Database, definitions: Definitions, tmp_path_factory: pytest.TempPathFactory
) -> PortalEnv:
    return build_env(database, definitions, tmp_path_factory.mktemp("portal"))
