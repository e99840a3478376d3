"""Typed configuration: a dataclass, filled from a YAML file and ``--set key=value`` overrides.

    config = load_config(SFTConfig, "sft.yaml", ["optim.lr=3e-5", "data.max_length=1024"])
    dump_config(config, run_dir / "config.yaml")   # the resolved config, reloadable as is

The YAML file holds the dataclass's fields; nested dataclasses are nested mappings and are addressed with
dotted keys in overrides. Missing keys keep the dataclass defaults. Values are checked against the field
types: int, float (finite only: NaN and infinities are refused; an int, or a string such as "1e-5", which
YAML 1.1 reads as a string, is accepted), bool, str, pathlib.Path, Enum (by value or name), Literal,
Optional / unions, list / tuple / set / dict of those, and nested dataclasses. An override's value is parsed with ``yaml.safe_load`` (``[1, 2]``, ``null``,
``true``) except for a str field, which takes the text as written unless it is a quoted YAML string.

Every problem raises `ConfigError` naming the key: an unknown key (with the closest valid one suggested),
a wrong type (with the expected type), a missing required key, a malformed override.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import pathlib
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "config_to_dict", "dump_config", "load_config"]

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A bad configuration; the message names the key (dotted path) and what was expected."""


@dataclasses.dataclass(frozen=True)
class _OverrideText:
    """An override's value as typed on the command line, parsed once the field's type is known."""

    text: str
    override: str


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as error:  # NameError for an annotation that cannot be resolved, and the like
        raise TypeError(f"cannot resolve the field types of {cls.__name__}: {error}") from error


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(prefix: str, name: str, valid: Iterable[str], origin: str = "") -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{_join(prefix, close[0])}'?" if close else f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{_join(prefix, name)}'{origin}; {hint}")


def _union_args(tp: Any) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type `tp` is, or the one dataclass in an Optional/union, else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    args = _union_args(tp)
    if args:
        found = [arg for arg in args if dataclasses.is_dataclass(arg) and isinstance(arg, type)]
        if len(found) == 1:
            return found[0]
    return None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        if issubclass(tp, enum.Enum):
            return f"one of {[member.value for member in tp]}"
        return tp.__name__
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    args = _union_args(tp)
    if args:
        return " or ".join(_type_name(arg) for arg in args)
    return str(tp).replace("typing.", "")


# ------------------------------------------------------------------------------------------- value checks


def _parse_override(value: _OverrideText, tp: Any, key: str) -> Any:
    args = _union_args(tp)
    wants_str = tp is str or (args is not None and {arg for arg in args if arg is not type(None)} == {str})
    try:
        parsed = yaml.safe_load(value.text)
    except yaml.YAMLError as error:
        if wants_str:
            return value.text
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"{key}: cannot parse the value of override '{value.override}' as YAML: {problem}"
        ) from None
    if wants_str and not isinstance(parsed, str) and not (parsed is None and _accepts_none(tp)):
        return value.text  # e.g. run_name=2024 stays the string "2024"
    return parsed


def _accepts_none(tp: Any) -> bool:
    args = _union_args(tp)
    return tp is type(None) or tp is Any or bool(args and type(None) in args)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked (and converted where lossless) against type `tp`; ConfigError naming `key` if not."""
    if isinstance(value, _OverrideText):
        value = _parse_override(value, tp, key)
    if tp is Any:
        return value
    mismatch = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    args = _union_args(tp)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise mismatch
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:  # Optional[X]: X's own message is the most precise
            raise errors[0]
        raise mismatch
    if tp is type(None):
        if value is None:
            return None
        raise mismatch
    nested = _dataclass_in(tp)
    if nested is not None:
        if isinstance(value, nested):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {nested.__name__} fields, got {value!r}")
        return _build(nested, value, key, base=None)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if any(value == choice and type(value) is type(choice) for choice in choices):
            return value
        raise mismatch
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        container = origin or tp
        if not isinstance(value, (list, tuple)):
            raise mismatch
        item_types = typing.get_args(tp)
        if container is tuple and item_types and not (len(item_types) == 2 and item_types[1] is Ellipsis):
            if len(value) != len(item_types):
                raise ConfigError(
                    f"{key}: expected {len(item_types)} items ({_type_name(tp)}), got {value!r}"
                )
            return tuple(
                _coerce(item, item_tp, f"{key}[{i}]")
                for i, (item, item_tp) in enumerate(zip(value, item_types))
            )
        item_tp = item_types[0] if item_types else Any
        return container(_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise mismatch
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.{k}"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise mismatch
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # "1e-5": YAML 1.1 reads exponents without a dot as strings
            except ValueError:
                pass
        if number is None:
            raise mismatch
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise mismatch
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
        raise mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise mismatch
    return value  # an annotation this module does not understand: passed through unchecked


# ---------------------------------------------------------------------------------------------- building


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type, values: Mapping[str, Any], prefix: str, base: Any) -> Any:
    """An instance of `cls` from a mapping of its fields; the others come from `base` or the defaults."""
    fields = _init_fields(cls)
    hints = _type_hints(cls)
    for name in values:
        if name not in fields:
            raise _unknown_key(prefix, str(name), fields)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        current = getattr(base, name) if base is not None else _field_default(f)
        if name not in values:
            if current is dataclasses.MISSING:
                raise ConfigError(f"missing required config key '{key}' ({_type_name(hints[name])})")
            continue
        value = values[name]
        nested = _dataclass_in(hints[name])
        if nested is not None and isinstance(value, Mapping):
            # A partial mapping updates the field's default instance rather than the nested class's defaults.
            nested_base = current if isinstance(current, nested) else None
            kwargs[name] = _build(nested, value, key, nested_base)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # a __post_init__ check
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from error


def _check_override_key(cls: type, parts: list[str], override: str) -> None:
    """Fails early, naming the override, when a dotted key does not name a field."""
    current: type | None = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if current is None:
            raise ConfigError(
                f"config key '{prefix}' in override '{override}' is not a nested config; "
                f"it has no key '{part}'"
            )
        fields = _init_fields(current)
        if part not in fields:
            raise _unknown_key(prefix, part, fields, origin=f" in override '{override}'")
        field_type = _type_hints(current)[part]
        if typing.get_origin(field_type) is dict or field_type is dict:
            return  # any sub-key of a dict field is allowed
        current = _dataclass_in(field_type)


def _apply_override(tree: dict[str, Any], cls: type, override: str) -> None:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must have the form key=value (e.g. optim.lr=3e-5)")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key")
    _check_override_key(cls, parts, override)
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = _OverrideText(text.strip(), override)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}"
        )
    return data


def load_config(
    cls: type[ConfigT], yaml_path: str | os.PathLike | None = None, overrides: Iterable[str] = ()
) -> ConfigT:
    """An instance of dataclass `cls` from its defaults, then `yaml_path`, then `overrides` ("a.b=value")."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    tree = _read_yaml(yaml_path) if yaml_path is not None else {}
    for override in overrides:
        _apply_override(tree, cls, override)
    return _build(cls, tree, "", base=None)


def config_to_dict(instance: Any) -> dict[str, Any]:
    """A dataclass instance as plain YAML-safe data (Path -> str, Enum -> value, tuple/set -> list)."""
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"instance must be a dataclass instance, got {instance!r}")
    return _plain(instance)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_plain(item) for item in items]
    return value


def dump_config(instance: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (atomically), in field order; `load_config` reads it back equal."""
    text = yaml.safe_dump(
        config_to_dict(instance), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
