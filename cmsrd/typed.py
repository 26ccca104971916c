"""Strict loading of plain data (parsed YAML, `--set` overrides) into frozen dataclasses: the one loader of
every config in the toolkit (dataset presets, method configs, training settings).

A key the dataclass does not declare is refused with the closest valid key (`cmsrd.errors.unknown_name`),
at any depth; values are type-checked against the annotations; the error names the dotted key. Blocks whose
class is picked by a `type:` key (optimizers, schedulers) are a union of dataclasses, each declaring
`type: Literal["Name"]`. A dataclass may define `validate(self, where)` for checks across its fields; it is
called with the block's dotted path once the block is built.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import InputError, unknown_name

# `field(metadata=INTERNAL)`: set by the program (a loader, the trainer), never by a config file
INTERNAL = {"cmsrd.typed.internal": True}


def is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("cmsrd.typed.internal"))


def user_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a config may set, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if not is_internal(f)}


def _type_tag(cls: type) -> str | None:
    """The `type:` value that selects dataclass `cls` in a union (its `Literal` annotation)."""
    tp = get_type_hints(cls).get("type")
    return get_args(tp)[0] if get_origin(tp) is Literal else None


def _union_of_dataclasses(value: Any, options: list[type], where: str) -> Any:
    """A mapping -> the dataclass its `type:` names (the first option when it has none)."""
    if not isinstance(value, dict):
        raise InputError(where, f"must be a mapping with a `type:` key, got {type(value).__name__}")
    tags = {_type_tag(c): c for c in options}
    tag = value.get("type", _type_tag(options[0]))
    if tag not in tags:
        raise unknown_name(f"{where}.type", f"unknown type {tag!r}", tag, tags)
    return build(tags[tag], value, where)


def _number(value: Any) -> float | None:
    """A number, also from a string: PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and converted where lossless) against the annotation `tp`; an InputError otherwise."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is type(None) or tp is type(None):
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        tagged = len(options) > 1 and all(dataclasses.is_dataclass(a) for a in options)
        if value is None:
            if len(options) < len(args):
                return None
            if tagged:  # like a single dataclass block left null: the defaults (of the first type)
                return options[0]()
            raise InputError(where, "must be set, got null")
        if len(options) == 1:
            return coerce(value, options[0], where)
        if tagged:
            return _union_of_dataclasses(value, options, where)
        errors = []
        for option in options:
            try:
                return coerce(value, option, where)
            except InputError as e:
                errors.append(e.problem)
        raise InputError(where, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise unknown_name(where, f"unknown value {value!r}", value, args)
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError(where, f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif args and len(args) != len(value):
            raise InputError(where, f"must be a list of {len(args)} values, got {len(value)}")
        return tuple(coerce(v, args[i], f"{where}[{i}]") if args else v for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(where, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        number = _number(value)
        if number is None:
            raise InputError(where, f"must be a number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(where, f"must be a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: Any, where: str = "", problem: str = "unknown key") -> Any:
    """A mapping -> dataclass `cls`; every key must be a field (`problem` says so otherwise), every value of
    its annotated type; fields without defaults are required. Then `cls.validate(where)`, if defined."""
    if not isinstance(data, dict):
        raise InputError(where or "config", f"must be a mapping of keys, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = user_fields(cls)
    kwargs = {}
    for key, value in data.items():
        at = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise unknown_name(at, problem, key, fields)
        kwargs[key] = coerce(value, hints[key], at)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(where or "config", f"missing required key(s) {missing}", "add them to the config")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A built config back to plain data (tuples as lists), internal fields left out: what YAML would hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not is_internal(f)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
