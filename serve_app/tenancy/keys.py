"""API keys: 256 random bits, shown once, stored only as ``sha256:<hex>``.

Why plain SHA-256 and not scrypt/PBKDF2: a slow, salted hash protects low-entropy secrets (passwords)
against guessing. These keys are 256-bit random values, so guessing one from its hash is already
infeasible; a slow hash would only add CPU time to every request (a denial-of-service lever at the
ingress) and, with per-key salts, turn the lookup of a key into a scan of every tenant's hashes.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "msk_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
