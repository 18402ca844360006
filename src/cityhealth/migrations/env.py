"""Alembic environment: migrates the database named by the settings (or the caller)."""

from alembic import context

from cityhealth.config import get_settings
from cityhealth.db import Database
from cityhealth.fhir.schema import metadata
from cityhealth.security import schema as _security_tables  # noqa: F401 (adds its tables)

config = context.config
url = config.attributes.get("database_url") or get_settings().database_url
connection = config.attributes.get("connection")


def run() -> None:
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    db = Database(url, pool_size=1)
    with db.engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=db.is_sqlite)
        with context.begin_transaction():
            context.run_migrations()
    db.dispose()


run()
