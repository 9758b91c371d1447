"""Typed configuration: dataclasses read from YAML, dotted ``key=value`` overrides, YAML out.

One small utility every verb uses, so configs behave the same everywhere::

    cfg = load_config(PretrainConfig, "conf/pretrain.yaml", ["optim.lr=1e-3", "model.num_hidden_layers=4"])
    print(to_yaml(cfg))            # what --print-config shows

Rules:

* Every key must name a field: an unknown key is an error that names the full dotted path and suggests the
  closest field (``unknown key 'optim.lrr' in conf.yaml (did you mean 'optim.lr'?)``).
* Values are checked against the field's annotation: ``bool``, ``int``, ``float`` (an int is accepted),
  ``str``, ``Optional[...]``/``X | None``, ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]``,
  ``Literal[...]``, nested dataclasses and ``Any``. A wrong type is an error naming the key, the expected
  type and the value.
* An override value is parsed as YAML (``true``, ``null``, ``[1, 2]``, ``{a: 1}``), except that a ``str``
  field takes the text verbatim and a ``float`` field accepts ``1e-4`` (which YAML 1.1 reads as a string).
* Nothing is ``eval``'d; there is no registry of names.
* After all overrides the dataclasses are rebuilt, so ``__post_init__`` checks see the merged values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from speechssl.errors import MissingInputError, UserError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "to_yaml",
    "apply_override",
    "load_config",
    "read_yaml",
]


class ConfigError(UserError):
    """A configuration problem; the message names the key (dotted path) and the source."""


_MISSING = object()


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # pragma: no cover - a broken annotation is a programming error
        raise TypeError(f"cannot resolve type annotations of {cls.__name__}: {e}") from e


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _where(path: str, source: str | None) -> str:
    loc = f"'{path}'" if path else "the top level"
    return f"{loc} in {source}" if source else loc


def _unknown_key(cls: type, key: str, prefix: str, source: str | None) -> ConfigError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    valid = ", ".join(names)
    return ConfigError(
        f"unknown key {_where(prefix + key, source)}{hint}; valid keys of {cls.__name__}: {valid}"
    )


def _convert(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in canonical form (tuples, floats...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str | None = None) -> ConfigError:
        exp = expected or _type_name(tp)
        return ConfigError(f"{_where(path, source)}: expected {exp}, got {value!r} ({type(value).__name__})")

    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the exact type match first (so 1 stays int in int | float), then the conversions.
        for a in sorted(args, key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1):
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, source)
            except ConfigError as e:
                errors.append(e)
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise bad("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return from_dict(tp, to_dict(value), _prefix=path + ".", _source=source)
        if not isinstance(value, Mapping):
            raise bad(f"a mapping for {tp.__name__}")
        return from_dict(tp, value, _prefix=path + ".", _source=source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("int")
    if tp is float:
        if isinstance(value, bool):
            raise bad("float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("str")
    if origin in (list, typing.List) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin in (tuple, typing.Tuple) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"{_type_name(tp)} with {len(args)} items")
        return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, typing.Dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise bad()
        kt, vt = args or (Any, Any)
        return {
            _convert(k, kt, f"{path}.<key>", source): _convert(v, vt, f"{path}.{k}", source)
            for k, v in value.items()
        }
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    raise TypeError(f"{_where(path, source)}: unsupported annotation {tp!r}")  # pragma: no cover


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _prefix: str = "", _source: str | None = None) -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking every key and type.

    Missing keys take the dataclass defaults; a missing key without a default is an error.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(_prefix.rstrip('.'), _source)}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(cls, str(key), _prefix, _source)
        kwargs[key] = _convert(value, hints[key], _prefix + key, _source)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_where(_prefix + name, _source)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f" ({_source})" if _source else ""
        raise ConfigError(f"invalid {cls.__name__}{' at ' + repr(_prefix.rstrip('.')) if _prefix else ''}{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested containers of them) -> plain dicts/lists/scalars (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Dumper(yaml.SafeDumper):
    pass


def _repr_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # Short lists of scalars on one line ([512, 10, 5]); longer structures in block style.
    flow = all(not isinstance(v, (list, dict)) for v in data) and len(data) <= 16
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _repr_list)


def to_yaml(obj: Any) -> str:
    """YAML text of a config; ``from_dict(type(obj), yaml.safe_load(to_yaml(obj))) == obj``."""
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingInputError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_override_value(raw: str, tp: Any) -> Any:
    """The text after ``=``: verbatim for str fields, YAML otherwise."""
    accepts_str = tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )
    if accepts_str:
        # Only null is special for an optional str; everything else is taken verbatim ("001" stays "001").
        if raw in ("null", "~", "None") and type(None) in typing.get_args(tp):
            return None
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_override(obj: T, override: str) -> T:
    """Apply one ``dotted.key=value`` override to dataclass ``obj`` in place (and return it)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    parts = key.split(".")
    target = obj
    prefix = ""
    for i, part in enumerate(parts):
        cls = type(target)
        fields = _fields(cls)
        if part not in fields:
            raise _unknown_key(cls, part, prefix, "command-line override")
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            value = _parse_override_value(raw, tp)
            setattr(target, part, _convert(value, tp, key, "command-line override"))
        else:
            nxt = getattr(target, part)
            if not (dataclasses.is_dataclass(nxt) and not isinstance(nxt, type)):
                raise ConfigError(
                    f"override {override!r}: '{prefix}{part}' is a {_type_name(tp)}, not a section with sub-keys"
                )
            target = nxt
            prefix += part + "."
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> a checked ``cls`` instance."""
    data = read_yaml(path) if path is not None else {}
    cfg = from_dict(cls, data, _source=str(path) if path is not None else None)
    overrides = list(overrides)
    for ov in overrides:
        apply_override(cfg, ov)
    if overrides:
        # Rebuild so __post_init__ validation runs on the merged values.
        cfg = from_dict(cls, to_dict(cfg), _source="merged config")
    return cfg
