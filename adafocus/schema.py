"""Typed reading of JSON records into dataclasses, with errors that name the key path.

``read_record(cls, data, "preprocessing")`` checks every field of the dataclass ``cls`` against its type
annotation (ints, floats, strings, bools, lists, dicts, ``X | None``, nested dataclasses) and returns an
instance; an unknown key gets a "did you mean" from the known ones, a missing key and a value of the wrong
type get one line naming the key path, the type expected and what was found::

    preprocessing.patch_size must be an integer, found the string '64'
    unknown key preprocessing.patch_sise (did you mean 'patch_size'?)

It is the one place where a manifest's JSON is trusted: code behind it reads typed values. Validation
errors are :class:`SchemaError` (a user error); callers add the file they read.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Union

from adafocus.errors import AdaFocusError

INT_LIMIT = 2**63  # integers must fit int64


class SchemaError(AdaFocusError):
    """A JSON record does not have the keys or types its dataclass declares."""


def read_record(cls: type, data: Any, path: str) -> Any:
    """``data`` (parsed JSON) as an instance of the dataclass ``cls``; SchemaError names the key path."""
    if not isinstance(data, dict):
        raise SchemaError(f"{path} must be an object, found {describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            raise SchemaError(f"unknown key {_join(path, key)}{did_you_mean(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{_join(path, name)} is missing")
            continue
        values[name] = check(data[name], hints[name], _join(path, name))
    return cls(**values)


def check(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (an int is accepted where a float is expected and
    converted); returns the value, with nested dataclasses built."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return check(value, option, path)
            except SchemaError as exc:
                errors.append(exc)
        raise SchemaError(f"{path} must be {expected(tp)}, found {describe(value)}") from errors[0]
    if dataclasses.is_dataclass(tp):
        return read_record(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:  # numpy, torch and ONNX take int64 at most
                raise SchemaError(f"{path} must be an integer below 2**63 in magnitude, found {describe(value)}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer literal beyond the float range (1 followed by 400 zeros)
                number = math.inf
            if not math.isfinite(number):
                raise SchemaError(f"{path} must be a finite number, found {describe(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            return [check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:  # tuple[float, float, float] (fixed length) or tuple[float, ...]
        args = typing.get_args(tp)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(check(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            _, item = typing.get_args(tp) or (str, Any)
            return {str(k): check(v, item, _join(path, str(k))) for k, v in value.items()}
    else:  # pragma: no cover - a dataclass field of a type this reader does not know
        raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")
    raise SchemaError(f"{path} must be {expected(tp)}, found {describe(value)}")


def expected(tp: Any) -> str:
    """'an integer', 'a list of numbers', 'a number or null', ... for an annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        names = [expected(o) for o in options if o is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in options else "")
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" if item is Any else f"a list of {_plural(expected(item))}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(expected(args[0]))}"
        return f"a list of {len(args)} {_plural(expected(args[0]))}"
    if origin is dict or tp is dict:
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, repr(tp))


def describe(value: Any) -> str:
    """What was found, for an error message: "the string '64'", 'null', 'a list of 2 items', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def did_you_mean(word: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known word, or ' (known: a, b, c)' when none is close."""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if len(known) <= 12 else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            noun = text[len(article):]
            return {"integer": "integers", "number": "numbers", "string": "strings", "object": "objects"}.get(
                noun, noun)
    return text


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
