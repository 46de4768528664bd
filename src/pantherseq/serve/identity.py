"""Which run and model a store's states belong to, and the refusal to mix them (issue 14).

The store's meta record `owner` = {"run_id", "model_version"}: `run_id` is the digest of the run's
tokenizer.json (what the stored token ids mean), `model_version` the checkpoint's (`panther@<sha256>[:12]`).
`embed` and `serve` claim an unowned store and refuse one owned by another:

- another run (another tokenizer): always refused: the states' and logs' token ids mean other things;
  embed into a new store;
- the same run, another model version: refused unless `--migrate`, which makes `serve` recompute every
  state's prediction with the new model before the first request (their windows are model inputs, kept in
  the state) and `embed` overwrite the states; either then records the new owner.

Stores written before the `owner` record are judged by their `embed` record's model version.
"""

from __future__ import annotations

import json

from pantherseq.errors import ConfigError
from pantherseq.store import Store

OWNER = "owner"


def read_owner(store: Store) -> dict | None:
    raw = store.get_meta(OWNER)
    if raw is None:
        embed = store.get_meta("embed")  # written before the owner record
        try:
            version = json.loads(embed).get("model_version") if embed else None
        except ValueError:
            version = None
        return {"run_id": None, "model_version": version} if version else None
    try:
        owner = json.loads(raw)
        if not isinstance(owner, dict) or not isinstance(owner.get("model_version"), str):
            raise TypeError
    except (ValueError, TypeError):
        raise ConfigError(f"{store!r}: its owner record is damaged; embed into a new store") from None
    return owner


def check_owner(store: Store, run_id: str, model_version: str, migrate: bool) -> bool:
    """True when the store must be migrated to `model_version` (allowed by `migrate`); ConfigError when it
    belongs to another run, or to another model without `migrate`."""
    owner = read_owner(store)
    if owner is None:
        return False
    if owner.get("run_id") not in (None, run_id):
        raise ConfigError(f"{store!r} holds states of another run (tokenizer {owner['run_id']}, this run's is "
                          f"{run_id}): their token ids mean other things; embed into a new store")
    if owner["model_version"] == model_version:
        return False
    if not migrate:
        raise ConfigError(f"{store!r} holds states of model {owner['model_version']}, not {model_version}: give "
                          f"--migrate to recompute them with this model, or embed into a new store")
    return True


def write_owner(store: Store, run_id: str, model_version: str) -> None:
    store.put_meta(OWNER, json.dumps({"run_id": run_id, "model_version": model_version}).encode())


__all__ = ["OWNER", "check_owner", "read_owner", "write_owner"]
