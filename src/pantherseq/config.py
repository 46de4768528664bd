"""Typed configs: dataclasses filled from TOML files and `key.path=value` overrides.

`build_config(cls, data)` turns a plain dict into a (nested) dataclass, checking every key and type:
an unknown key raises `ConfigError` naming the valid keys, a wrong type names the expected one.
`load_toml` reads a file, `merge` deep-merges dicts (a user file over a built-in one) and
`apply_overrides` applies `a.b.c=value` strings whose values are parsed as TOML (`bins=20`,
`name="x"`, `fields=["a","b"]`; a bare word is taken as a string, `none` / `null` as None).
`load_config(cls, file, overrides)` does all three: the one loader of a stage's config.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from pantherseq.errors import ConfigError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_value(text: str) -> Any:
    if text.lower() in ("none", "null"):  # TOML has no null; an override may unset an optional key
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a config dict (returns a new dict)."""
    out = data
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        patch: dict[str, Any] = {}
        node = patch
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(text.strip())
        out = merge(out, patch)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (
            tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def build_config(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise ConfigError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def load_config(cls: type[T], file: str | Path | None = None, overrides: list[str] | None = None,
                where: str | None = None) -> T:
    """Dataclass `cls` from a TOML `file` (optional) with `key.path=value` overrides applied over it.

    Errors name `where` (default: the file, else "config"); unknown keys and wrong types raise ConfigError."""
    raw = load_toml(file) if file else {}
    return build_config(cls, apply_overrides(raw, overrides), where or (str(file) if file else "config"))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict with None values dropped (TOML has no null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(cfg))


def save_toml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))
