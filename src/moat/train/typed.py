"""Values typed into a dataclass field's type: strings from the command line (`--set
KEY=VALUE`) and YAML/JSON values alike. Shared by `TrainConfig` and the tasks' typed
`task_options` (`moat.tasks.options`), so both take the same spellings."""

from __future__ import annotations

import types
import typing
from typing import Any

from moat.errors import InvalidInputError

__all__ = ["coerce", "jsonable", "parse_scalar"]


def parse_scalar(text: str) -> Any:
    """YAML-ish parsing of one command-line value ('1e-3' is a float here, unlike YAML 1.1)."""
    import yaml

    try:
        return float(text) if _looks_float(text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _looks_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity") and not text.isdigit()


def coerce(value: Any, hint: Any) -> Any:
    """Convert `value` (a string from the command line, or a YAML/JSON value) to `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in
                             ("none", "null", "~", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise InvalidInputError("; ".join(errors))
    if isinstance(value, str) and (origin in (tuple, list) or hint in (list, dict)):
        value = parse_scalar(value)
        if isinstance(value, str):  # "2,15" -> [2, 15]
            value = [parse_scalar(v.strip()) for v in value.strip("[]()").split(",")]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise InvalidInputError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise InvalidInputError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            value = value.strip()
            f = float(value)  # accepts "1e3"
            if not f.is_integer():
                raise InvalidInputError(f"expected an integer, got {value!r}")
            return int(f)
        if isinstance(value, int):
            return value
        raise InvalidInputError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise InvalidInputError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InvalidInputError(f"expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"expected a list of {len(args)} values, got {value!r}")
        if len(value) != len(args):
            raise InvalidInputError(f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    if hint is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"expected a list, got {value!r}")
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise InvalidInputError(f"expected a mapping, got {value!r}")
        return dict(value)
    return value


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
