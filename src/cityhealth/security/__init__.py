"""Security building blocks: passwords, signing keys, access tokens and SMART scopes."""
