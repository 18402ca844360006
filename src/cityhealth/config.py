"""Settings, read once from CITYHEALTH_* environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CITYHEALTH_", extra="ignore")

    #: SQLAlchemy URL; SQLite file under ./var by default, e.g.
    #: postgresql+psycopg://postgres@127.0.0.1:5432/cityhealth in production.
    database_url: str = "sqlite:///./var/cityhealth.db"
    #: The FHIR package cache (the layout of the FHIR community's tools).
    fhir_package_cache: Path = Path.home() / ".fhir" / "packages"
    #: The package holding the official R4 definition bundles.
    fhir_core_package: str = "hl7.fhir.r4.examples@4.0.1"
    #: Where compiled definitions are cached for fast start-up.
    var_dir: Path = Path("./var")
    #: Public base URL of the FHIR endpoint; derived from each request when unset.
    fhir_base_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    #: Database connections per worker process, and the number of requests a worker runs at
    #: once in its threads (more would wait for a connection).
    db_pool_size: int = 20
    search_default_count: int = 20
    search_max_count: int = 1000
    #: Most results an _include / _revinclude may add to one page.
    search_max_includes: int = 1000
    log_level: str = "info"
    #: Public URL of the platform: the issuer of its access tokens (…/fhir is their audience).
    public_url: str = "http://127.0.0.1:8000"
    #: Signing keys of access tokens; made on first start, rotated every `key_rotation_days`.
    keys_dir: Path | None = None  # default: var_dir / "keys"
    key_rotation_days: int = 30
    access_token_minutes: int = 5
    refresh_token_days: int = 30
    session_idle_minutes: int = 30
    password_min_length: int = 8
    password_max_age_days: int = 90
    password_history: int = 5
    lockout_failures: int = 5
    lockout_minutes: int = 15
    #: Minutes an emergency (break-glass) declaration opens a patient's record to its declarer.
    break_glass_minutes: int = 120
    #: Days the audit trail keeps records of access (reads, searches), and of processing
    #: (writes, sign-ins, emergencies), before `cityhealth audit prune` may remove them: at
    #: least 6 months and 3 years (网络安全法 art. 21, 等保 level 3; medical records rules).
    audit_access_days: int = Field(default=183, ge=183)
    audit_processing_days: int = Field(default=1095, ge=1095)
    #: Hours a finished export (its job and files) is kept.
    export_retention_hours: int = 24
    #: Resources per NDJSON file; a larger type continues in Type.2.ndjson, …
    export_max_resources_per_file: int = 500_000
    #: Rows read per round trip while exporting.
    export_batch_size: int = 1000
    #: Seconds between two looks at the job table (a job submitted in this process starts at once).
    jobs_poll_seconds: float = 2.0
    #: A running job whose heartbeat is older than this was left by a dead process and is rerun.
    jobs_stale_seconds: float = 300.0


@lru_cache
def get_settings() -> Settings:
    return Settings()
