"""Input checks shared by the metric modules: fail early, before any model is touched."""

from __future__ import annotations

from typing import Any, Sequence


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def as_list(name: str, values: Any) -> list:
    """``values`` as a list; rejects None, strings, dicts and other non-sequences."""
    if values is None:
        raise ValueError(f"{name} is required (got None)")
    if isinstance(values, (str, bytes, dict)):
        raise TypeError(f"{name} must be a list of strings, got a single {_type_name(values)}")
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{name} must be a list, got {_type_name(values)}") from None


def check_strings(name: str, values: Any, *, allow_empty_list: bool = False) -> list[str]:
    """A non-empty list whose items are all ``str`` (empty strings are allowed)."""
    items = as_list(name, values)
    if not items and not allow_empty_list:
        raise ValueError(f"{name} is an empty list; give at least one sample")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a string, got {_type_name(item)}")
    return items


def check_string_lists(
    name: str, values: Any, *, allow_str: bool = False, allow_empty_item: bool = False
) -> list[list[str]]:
    """A non-empty list of lists of strings (one list per sample).

    ``allow_str`` accepts a bare string for a sample (read as a one-item list);
    ``allow_empty_item`` accepts a sample with no string at all.
    """
    items = as_list(name, values)
    if not items:
        raise ValueError(f"{name} is an empty list; give at least one sample")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not allow_str:
                raise TypeError(f"{name}[{i}] must be a list of strings, got a single string")
            out.append([item])
            continue
        if item is None or isinstance(item, (bytes, dict)) or not isinstance(item, Sequence):
            raise TypeError(f"{name}[{i}] must be a list of strings, got {_type_name(item)}")
        sub = list(item)
        if not sub and not allow_empty_item:
            raise ValueError(f"{name}[{i}] is an empty list; every sample needs at least one reference")
        for j, s in enumerate(sub):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}][{j}] must be a string, got {_type_name(s)}")
        out.append(sub)
    return out


def check_same_length(a_name: str, a: Sequence, b_name: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}")


def check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {_type_name(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
