"""Parameter selection by pattern, shared by freezing, parameter groups and gradual unfreezing.

A pattern is a glob, a ``re:`` regular expression or a submodule (the rules are in the package
docstring, :mod:`trainpatterns.transfer`); a name is selected when the pattern matches it or the
name of any module above it. Every caller goes through :func:`select` or :class:`Matcher`, so the
rules, and the error for a pattern that selects nothing, are the same everywhere.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Optional, Union

from torch import nn

Pattern = Union[str, nn.Module]
Patterns = Union[Pattern, Iterable[Pattern], None]


def _as_pattern_list(patterns: Patterns) -> Optional[list]:
    if patterns is None:
        return None
    if isinstance(patterns, (str, nn.Module)):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, (str, nn.Module)):
            raise TypeError(f"a pattern must be a string or an nn.Module, got {type(p).__name__}: {p!r}")
    return out


def _compile(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _prefixes(name: str) -> list:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module path down to the name itself."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class Matcher:
    """One compiled pattern; ``covers(name)`` is True when the name or a module above it matches."""

    def __init__(self, model: nn.Module, pattern: Pattern) -> None:
        self.pattern = pattern
        if isinstance(pattern, nn.Module):
            names = [n for n, m in model.named_modules() if m is pattern]
            if not names:
                raise ValueError(f"module {type(pattern).__name__} passed as a pattern is not a submodule of "
                                 f"the model")
            self._module_names = set(names)
            self._fn = None
        else:
            if not pattern:
                raise ValueError("an empty string is not a pattern (use None to select the whole model)")
            self._fn = _compile(pattern)

    def covers(self, name: str) -> bool:
        if name == "":
            return self._fn is None and "" in self._module_names
        if self._fn is None:
            return "" in self._module_names or any(p in self._module_names for p in _prefixes(name))
        return any(self._fn(p) for p in _prefixes(name))

    def describe(self) -> str:
        return repr(self.pattern) if isinstance(self.pattern, str) else f"module {type(self.pattern).__name__}"


def _matchers(model: nn.Module, patterns: Patterns) -> Optional[list]:
    plist = _as_pattern_list(patterns)
    return None if plist is None else [Matcher(model, p) for p in plist]


def no_match_error(model: nn.Module, matcher: Matcher, what: str = "parameter or module") -> ValueError:
    examples = [n for n, _ in model.named_parameters()][:4]
    return ValueError(f"pattern {matcher.describe()} matches no {what} of {type(model).__name__} "
                      f"(parameter names look like {examples}; globs use fnmatch rules, regexes need 're:')")


def select(model: nn.Module, patterns: Patterns) -> tuple[list, list]:
    """(selected (name, param) pairs, selected (name, module) pairs) for ``patterns``; every
    pattern must select at least one parameter or module."""
    matchers = _matchers(model, patterns)
    named_params = list(model.named_parameters())
    named_modules = list(model.named_modules())
    if matchers is None:
        return named_params, named_modules
    params = [(n, p) for n, p in named_params if any(m.covers(n) for m in matchers)]
    modules = [(n, mod) for n, mod in named_modules if any(m.covers(n) for m in matchers)]
    for m in matchers:
        if not any(m.covers(n) for n, _ in named_params) and not any(m.covers(n) for n, _ in named_modules):
            raise no_match_error(model, m)
    return params, modules
