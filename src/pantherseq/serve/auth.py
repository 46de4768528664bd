"""API keys with scopes for the scoring service (SPEC §8, issue 14; docs/SECURITY.md).

A caller sends `Authorization: Bearer <token>`. The service keeps only the SHA-256 of each token, with a
key id (what the access log names, never the token) and the key's scopes:

    score       POST /score, POST /score/batch
    feedback    POST /feedback
    read-state  GET /users/{id}/state
    admin       GET /stats?reset=true, and GET /metrics when the service is told to guard it

The keys come from a file (`--api-keys FILE`: TOML when the name ends in .toml, JSON otherwise) or from
the environment variable `PANTHERSEQ_API_KEYS` (the same JSON text):

    [keys.fraud-gateway]                               {"keys": {"fraud-gateway": {
    sha256 = "<64 hex digits: sha256 of the token>"        "sha256": "<64 hex digits>",
    scopes = ["score", "feedback"]                         "scopes": ["score", "feedback"]}}}

`python -m pantherseq.serve.auth ID SCOPE[,SCOPE...]` prints a new random token and the entry to add.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pantherseq.errors import ConfigError, echo

SCOPES = ("score", "feedback", "read-state", "admin")
ENV = "PANTHERSEQ_API_KEYS"
_KEY_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as a keys file holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    scopes: frozenset[str]


class ApiKeys:
    """The accepted keys by the SHA-256 of their token."""

    def __init__(self, by_hash: dict[str, ApiKey]):
        if not by_hash:
            raise ConfigError("the API keys hold no key")
        self.by_hash = by_hash

    @classmethod
    def parse(cls, data: object, source: str) -> ApiKeys:
        """Keys from the parsed file: {"keys": {key_id: {"sha256": hex, "scopes": [...]}}}."""
        if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], dict):
            raise ConfigError(f"{source}: expected one table `keys` of key id -> {{sha256, scopes}}")
        by_hash: dict[str, ApiKey] = {}
        for key_id, entry in data["keys"].items():
            where = f"{source}: key {echo(key_id)}"
            if not _KEY_ID.fullmatch(str(key_id)):
                raise ConfigError(f"{where}: a key id is 1..64 of A-Z a-z 0-9 _ . @ -")
            if not isinstance(entry, dict) or set(entry) != {"sha256", "scopes"}:
                raise ConfigError(f"{where}: expected exactly `sha256` and `scopes` (the token itself is never "
                                  f"stored: python -m pantherseq.serve.auth makes one)")
            digest, scopes = str(entry["sha256"]).lower(), entry["scopes"]
            if not _HEX.fullmatch(digest):
                raise ConfigError(f"{where}: sha256 must be 64 hex digits")
            if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
                raise ConfigError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
            if digest in by_hash:
                raise ConfigError(f"{where}: the same token as key {by_hash[digest].key_id!r}")
            by_hash[digest] = ApiKey(str(key_id), frozenset(scopes))
        return cls(by_hash)

    @classmethod
    def load(cls, path: str | None = None, environ: dict[str, str] | None = None) -> ApiKeys | None:
        """The keys of `path`, else of $PANTHERSEQ_API_KEYS, else None (no authentication)."""
        environ = os.environ if environ is None else environ
        if path:
            file = Path(path)
            try:
                text = file.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read the API keys file {path}: {e.strerror}") from None
            try:
                data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
            except (ValueError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"API keys file {path} is not valid {file.suffix == '.toml' and 'TOML' or 'JSON'}: "
                                  f"{str(e)[:200]}") from None
            return cls.parse(data, path)
        if environ.get(ENV):
            try:
                data = json.loads(environ[ENV])
            except ValueError as e:
                raise ConfigError(f"${ENV} is not valid JSON: {str(e)[:200]}") from None
            return cls.parse(data, f"${ENV}")
        return None

    def check(self, authorization: str | None) -> ApiKey | None:
        """The key of an `Authorization: Bearer <token>` header value, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or len(token) > 512:
            return None
        digest = hash_token(token.strip())
        for known, key in self.by_hash.items():  # constant time per entry: no timing hint on the digest
            if hmac.compare_digest(known, digest):
                return key
        return None


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pantherseq.serve.auth KEY_ID SCOPE[,SCOPE...]", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    scopes = argv[1].split(",")
    try:
        ApiKeys.parse({"keys": {argv[0]: {"sha256": hash_token(token), "scopes": scopes}}}, "arguments")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"token (give it to the caller; it is not stored): {token}\n\n[keys.{argv[0]}]\n"
          f"sha256 = \"{hash_token(token)}\"\nscopes = {json.dumps(scopes)}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


__all__ = ["ENV", "SCOPES", "ApiKey", "ApiKeys", "hash_token"]
