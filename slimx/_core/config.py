"""Strict, serialisable configs: built from user text (flags, recipe tables, gate and sweep files, API keywords),
refusing unknown keys (with a did-you-mean) and values of the wrong type, checked against each field's type
annotation structurally (``typing.get_origin`` / ``get_args``: tuples, lists, unions, literals).

Shared by every stage that takes options from the user: passes (``slim``), quantization (``quant``), the
targets' format options (``targets``), the export config (``slimx.config``) and the gate and sweep files, which
are read by the one strict TOML reader here (``read_toml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from pathlib import Path

from slimx._core.errors import UsageError

CONFIG_VERSION = 1


def did_you_mean(word: str, choices) -> str:
    """``"did you mean 'runs'? "`` for the closest of ``choices``, or ``""``.

    Example:
        >>> did_you_mean("runz", ["runs", "warmup"])
        "did you mean 'runs'? "
    """
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def check_keys(values, known, where: str, takes: str = "", noun: str = "option") -> None:
    """Refuse keys of ``values`` not in ``known``, naming the closest known key for each.

    Example:
        >>> try:
        ...     check_keys({"runz": 40}, {"runs", "warmup"}, "flags")
        ... except UsageError as exc:
        ...     print(exc.line())
        flags: unknown option(s) runz; did you mean 'runs'? it takes runs, warmup
    """
    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    hints = "".join(did_you_mean(k, known) for k in unknown[:3])
    raise UsageError(where, f"unknown {noun}(s) {', '.join(unknown)}",
                     f"{hints}{takes or 'it takes ' + ', '.join(sorted(known))}")


def field_types(cls: type) -> dict[str, object]:
    """Each dataclass field's resolved type annotation (``from __future__ import annotations`` leaves strings)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming what the module does not import: check nothing
        hints = {}
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls)}


def config_from_dict(cls: type, values: dict, where: str):
    """Build a frozen config dataclass from ``values``, refusing unknown keys and wrong types.

    Strings (from flags and ``K=V`` text) are parsed to the field's type; other values are checked against it.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Cfg:
        ...     sizes: tuple[int, ...] = ()
        ...     mode: typing.Literal["fast", "slow"] = "fast"
        >>> config_from_dict(Cfg, {"sizes": "16|32"}, "--x").sizes
        (16, 32)
        >>> try:
        ...     config_from_dict(Cfg, {"mode": "slwo"}, "--x")
        ... except UsageError as exc:
        ...     print(exc.line())
        --x mode: 'slwo' is not one of 'fast', 'slow'; did you mean 'slow'? give one of them
    """
    types_ = field_types(cls)
    check_keys(values, types_, where, f"{cls.__name__} takes {', '.join(sorted(types_))}")
    typed = {key: coerce(value, types_[key], f"{where} {key}") for key, value in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:
        raise UsageError(where, str(exc), f"see {cls.__name__}'s options") from exc


def config_to_dict(cfg) -> dict:
    return {"version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def _name(annotation) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a {origin.__name__} of {_name(args[0])}" if args else f"a {origin.__name__}"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


class _Mismatch(Exception):
    pass


def coerce(value, annotation, where: str):
    """``value`` as ``annotation`` wants it: text parsed, anything else checked (UsageError naming ``where``).

    Example:
        >>> coerce("16|32", tuple[int, ...], "--buckets")
        (16, 32)
        >>> coerce(["a", "b"], tuple[str, ...], "passes")
        ('a', 'b')
        >>> try:
        ...     coerce([1, "x"], tuple[int, ...], "sizes")
        ... except UsageError as exc:
        ...     print(exc.line())
        sizes: ['x'] is not an integer (item 2); give a tuple of an integer
    """
    try:
        return _coerce(value, annotation)
    except _Mismatch as exc:
        text = str(exc)
        raise UsageError(where, text, _fix(annotation, value)) from None


def _fix(annotation, value) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return f"{did_you_mean(value, [str(a) for a in typing.get_args(annotation)])}give one of them"
    return f"give {_name(annotation)}"


def _coerce(value, annotation):
    if annotation is typing.Any or annotation is object:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null", "") and _allows_none(annotation):
            return None
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        # text goes to the most specific member first (an int before a float before str)
        for member in sorted(members, key=_rank):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch(f"{value!r} is not {_name(annotation)}")
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value.strip()):
                return allowed
        raise _Mismatch(f"{value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [t for t in re.split(r"[|;]", value) if t.strip()]
        if not isinstance(value, (tuple, list)):
            raise _Mismatch(f"{value!r} is not {_name(annotation)}")
        if origin is tuple and args and Ellipsis not in args:  # fixed length: tuple[int, str]
            if len(args) != len(value):
                raise _Mismatch(f"{value!r} has {len(value)} items, not {len(args)}")
            items = args
        else:
            items = [args[0] if args else typing.Any] * len(value)
        out = []
        for i, (item, kind) in enumerate(zip(value, items, strict=True)):
            try:
                out.append(_coerce(item, kind))
            except _Mismatch:
                raise _Mismatch(f"{[item]!r} is not {_name(kind)} (item {i + 1})") from None
        return tuple(out) if origin is tuple else out
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{value!r} is not a table")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise _Mismatch(f"{value!r} is not true or false")
    if annotation in (int, float):  # an int field takes a float only when it is whole; bool is neither
        if isinstance(value, str):
            try:
                return annotation(value.strip())
            except ValueError:
                raise _Mismatch(f"{value!r} is not {_name(annotation)}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                annotation is float or float(value).is_integer()):
            return annotation(value)
        raise _Mismatch(f"{value!r} is not {_name(annotation)}")
    if annotation is str:
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, Path):
            return str(value)
        raise _Mismatch(f"{value!r} is not text")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise _Mismatch(f"{type(value).__name__} {value!r} is not {_name(annotation)}")
    return value


def _allows_none(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)


def _rank(annotation) -> int:
    return {bool: 0, int: 1, float: 2}.get(annotation, 5 if annotation is str else 3)


def parse_key_values(text: str, where: str, example: str) -> dict[str, str]:
    """``a=1,b=x`` -> {"a": "1", "b": "x"}; anything else is a usage error naming ``where``."""
    values = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(where, f"{item!r} is not KEY=VALUE", f"write {example}")
        values[key.strip()] = value.strip()
    return values


def read_toml(path: str | Path, what: str, known: set[str] | None = None, fix: str = "",
              where: str | None = None) -> dict:
    """A strict TOML file: it must exist and parse, its top-level keys be among ``known`` (did-you-mean for
    the others) and its ``version``, where given, be ``CONFIG_VERSION``. The recipe, gate and sweep files are
    all read here.

    Args:
        path: the file.
        what: what the file is, for messages ("gate file", "--recipe").
        known: the top-level keys it may hold (None: any).
        fix: how to write one, for the messages.
        where: the name messages give the file (default ``f"{what} {path}"``).
    """
    path = Path(path)
    where = where or f"{what} {path}"
    if not path.is_file():
        raise UsageError(where, "does not exist" if not path.exists() else "is not a file", fix or "give a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(where, f"is not valid TOML ({exc})", "fix the file") from None
    if known is not None:
        check_keys(data, known | {"version"}, where, f"a {what} holds {', '.join(sorted(known | {'version'}))}",
                   noun="key")
    version = data.get("version", CONFIG_VERSION)
    if isinstance(version, bool) or version != CONFIG_VERSION:
        raise UsageError(where, f"is version {version!r}; this slimx reads version {CONFIG_VERSION}",
                         f"set version = {CONFIG_VERSION}")
    return data
