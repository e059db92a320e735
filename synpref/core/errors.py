"""User errors: what the `synpref` command prints as one `synpref: error:` line instead of a traceback."""

from __future__ import annotations

import argparse
import re
from typing import Any, Optional


class SynprefError(Exception):
    """A mistake the user can fix (a path, a value, a row): shown as its message alone, exit `exit_code`."""

    exit_code = 2


class ConfigError(SynprefError, ValueError):
    """A configuration value that cannot work, named by its config key."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"config key {key!r}: {problem}")

    def __reduce__(self):
        return type(self), (self.key, self.problem)


# -- the data layer's errors ---------------------------------------------------------------------
class DataError(SynprefError, ValueError):
    """Bad input, located: which file, which row, which field."""

    def __init__(self, source: str, row: Any, field: str, problem: str):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        where = f"{source}: " if row is None else f"{source}: row {row}: "
        what = "" if field == "*" else f"field {field!r}: "  # '*': the whole row or file
        super().__init__(f"{where}{what}{problem}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses processes (datasets' map with num_proc > 1).
        return type(self), (self.source, self.row, self.field, self.problem)


class FieldError(ValueError):
    """A field-level problem; the data layer adds file and row and raises DataError."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):
        return type(self), (self.field, self.problem)


def find_user_error(exc: BaseException) -> Optional[SynprefError]:
    """The SynprefError behind `exc`: itself, or one it wraps (jsonargparse wraps what a class's
    __init__ raises while instantiating the config into a generic 'does not validate' error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SynprefError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user error: a SynprefError, or a config jsonargparse rejected; None otherwise."""
    found = find_user_error(exc)
    if found is not None:
        return str(found)
    if isinstance(exc, argparse.ArgumentError):
        return config_message(exc)
    return None


_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":\s*')


def _plain(problem: str, given: Optional[str] = None) -> str:
    """'Expected a <class 'int'>. Got value: x' -> "expected int, got 'x'"."""
    problem = _CLASS.sub(r"\1", problem).replace("typing.Literal", "one of ")
    m = re.match(r"Expected a (.*?)\.?(?: Got value: (.*))?$", problem, re.S)
    if m is None:
        return problem
    got = m.group(2) if m.group(2) is not None else given
    return f"expected {m.group(1)}" + (f", got {got.strip()!r}" if got is not None else "")


def config_message(exc: argparse.ArgumentError) -> str:
    """jsonargparse's parse error (usage text and a union dump) cut to the key, the problem and a fix."""
    text = str(exc).strip()
    top = _PARSER_KEY.match(text)
    key = top.group(1) if top else None
    given = re.search(r"^\s*Given value: (.*)$", text, re.M)
    given = given.group(1) if given else None
    problems = []
    if "Errors:" in text:
        # A union's alternatives: "- <problem>" lines, each possibly continued by deeper-indented ones.
        for item in re.split(r"^\s*- ", text.split("Errors:", 1)[1], flags=re.M)[1:]:
            lines = [ln.strip() for ln in item.splitlines() if ln.strip()]
            item = " ".join(ln for ln in lines if not ln.startswith("Given value"))
            if "<class 'NoneType'>" not in item:
                problems.append(item)
    else:
        problems = [text[top.end() :] if top else text]
    where, problem = key, "; ".join(_plain(p, given) for p in problems) or text.splitlines()[0]
    nested = re.match(r"Problem with given class_path '([^']+)':\s*(.*)", problems[0], re.S) if problems else None
    if nested:
        cls, rest = nested.groups()
        inner, option = _PARSER_KEY.match(rest), re.search(r"Option '([^']+)' is not accepted", rest)
        if inner:
            where, problem = f"{key}.init_args.{inner.group(1)}", _plain(rest[inner.end() :])
        elif option:
            where, problem = f"{key}.init_args.{option.group(1)}", f"{cls} has no argument {option.group(1)!r}"
        else:
            problem = f"unknown class_path {cls!r} ({rest}); give an importable class, e.g. synpref.modules.SFTModule"
    return f"{f'config key {where!r}: ' if where else ''}{problem} (see --help)"
