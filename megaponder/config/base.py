"""Machinery shared by every config section: documented fields, YAML/dict loading with
unknown-key detection, ``--set`` coercion, and the error type users see."""
from __future__ import annotations

import dataclasses
import difflib
import reprlib
import types
import typing
from typing import Any

from ..errors import UserError
from ..models.args import param  # noqa: F401  (the documented field; the model sections use it too)


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased as what is wrong and what to change."""


def _nearest(name: str, options: list[str], section: str = "") -> str:
    """The hint after an unknown name; ``section`` prefixes keys ('train.steps', not 'steps',
    so the hint can be pasted into --set as it is)."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if match:
        return f" Did you mean '{_join(section, match[0])}'?"
    return f" Valid keys: {', '.join(_join(section, o) for o in sorted(options))}."


_SHORT = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
for _name, _limit in dict(maxlevel=2, maxtuple=4, maxlist=4, maxarray=4, maxdict=4, maxset=4,
                          maxfrozenset=4, maxdeque=4, maxstring=60, maxlong=40, maxother=60).items():
    setattr(_SHORT, _name, _limit)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to a short prefix for an error message: never the whole of a huge
    value (reprlib stops after a few items, whatever the value's size)."""
    text = repr(value[:limit]) if isinstance(value, str) else _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML / ``--set`` value to the declared field type, or say why not."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here; give a value of type {getattr(tp, '__name__', tp)}.")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {short(value)} is not one of {list(choices)}.{_nearest(str(value)[:100], [str(c) for c in choices])}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union:  # e.g. str | list[str]
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot interpret {short(value)} as {tp}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {short(value)}.")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {short(value)}.")
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ConfigError(f"{where}: expected an integer, got {short(value)}.") from None
        if not -2 ** 63 <= number < 2 ** 63:
            raise ConfigError(f"{where}: {str(value)[:40]} does not fit a 64-bit integer; give a "
                              f"value below 2**63 (9.2e18).")
        return number
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {short(value)}.") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {short(value)}.")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got "
                          f"{type(data).__name__} {short(data)}.")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"Unknown config key '{_join(where, str(key))}'.{_nearest(str(key), names, where)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], _join(where, f.name))
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def field_docs(cls, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field, for the reference doc."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            yield from field_docs(tp, key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        yield key, tp, default, f.metadata.get("help", "")
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):   # a list of sections: document one entry's keys
            yield from field_docs(item, key + "[]")
