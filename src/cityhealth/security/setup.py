"""The security services of one process, made from the CITYHEALTH_* settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.security.accounts import Accounts, SecuritySettings
from cityhealth.security.keys import KeyRing
from cityhealth.security.passwords import PasswordPolicy
from cityhealth.security.tokens import TokenService


def security_settings(settings: Settings) -> SecuritySettings:
    public = settings.public_url.rstrip("/")
    return SecuritySettings(
        issuer=public,
        audience=f"{public}/fhir",
        access_token_minutes=settings.access_token_minutes,
        refresh_token_days=settings.refresh_token_days,
        session_idle_minutes=settings.session_idle_minutes,
        password_policy=PasswordPolicy(
            min_length=settings.password_min_length,
            max_age_days=settings.password_max_age_days,
            history=settings.password_history,
            max_failures=settings.lockout_failures,
            lockout_minutes=settings.lockout_minutes,
        ),
    )


@dataclass(frozen=True)
class Security:
    settings: SecuritySettings
    accounts: Accounts
    keyring: KeyRing
    tokens: TokenService
    rotation: timedelta

    @classmethod
    def build(cls, settings: Settings, db: Database) -> Security:
        config = security_settings(settings)
        keyring = KeyRing.load_or_create(settings.keys_dir or settings.var_dir / "keys")
        tokens = TokenService(
            keyring, config.issuer, config.audience, access_minutes=config.access_token_minutes
        )
        rotation = timedelta(days=settings.key_rotation_days)
        return cls(config, Accounts(db, config), keyring, tokens, rotation)

    def rotate_keys(self) -> None:
        """A new signing key once the current one is older than the rotation period; keys
        retired long enough ago are removed (their tokens have all expired)."""
        now = self.keyring.clock()
        if now - self.keyring.current.created >= self.rotation:
            self.keyring.rotate(now)
        self.keyring.prune(now)
