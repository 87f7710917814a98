"""Strict, serialisable configs: built from user text (flags, recipe tables), refusing unknown keys and wrong types.

Shared by every stage that takes options from the user: passes (``slim``), quantization (``quant``) and the
targets' format options (``targets``).
"""

from __future__ import annotations

import dataclasses
import re

from slimx._core.errors import UsageError

CONFIG_VERSION = 1


def config_from_dict(cls: type, values: dict, where: str):
    """Build a frozen config dataclass from ``values``, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{where}", f"unknown option(s) {', '.join(unknown)}",
                         f"{cls.__name__} takes {', '.join(sorted(fields))}")
    typed = {}
    for key, value in values.items():
        typed[key] = _coerce(value, fields[key].type, f"{where} {key}")
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:
        raise UsageError(where, str(exc), f"see {cls.__name__}'s options") from exc


def config_to_dict(cfg) -> dict:
    return {"version": CONFIG_VERSION, **dataclasses.asdict(cfg)}


def _coerce(value, annotation, where: str):
    kind = str(annotation)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            return None
        if "bool" in kind and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        for name, parse, noun in (("float", float, "a number"), ("int", int, "an integer")):
            if name not in kind:
                continue
            try:
                return parse(text)
            except ValueError:
                if "str" not in kind:
                    raise UsageError(where, f"{text!r} is not {noun}", f"give {noun}") from None
        if "tuple" in kind:
            return tuple(t for t in re.split(r"[|;]", text) if t)
        return text
    if isinstance(value, list):
        return tuple(value)
    return value


def parse_key_values(text: str, where: str, example: str) -> dict[str, str]:
    """``a=1,b=x`` -> {"a": "1", "b": "x"}; anything else is a usage error naming ``where``."""
    values = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(where, f"{item!r} is not KEY=VALUE", f"write {example}")
        values[key.strip()] = value.strip()
    return values


