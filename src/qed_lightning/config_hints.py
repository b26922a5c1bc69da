"""Config parse errors as one line with a did-you-mean (`--model.init_args.gruop_size` -> "did you mean group_size?").

jsonargparse reports a key that a class does not take inside a many-line "Does not validate against any of the
Union subtypes" listing; `parse_error` finds the unknown key in that message, the names the class does take
(`__init__` and the bases its `**kwargs` reach), and the closest one (`difflib`). No framework import: the parser
and the classes are already loaded when it runs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from qed_lightning.data.loading import ConfigError

__all__ = ["did_you_mean", "init_argument_names", "parse_error"]

_NOT_ACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted")
_CLASS_PATH = re.compile(r"given class_path '([\w.]+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)", re.IGNORECASE)
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')


def did_you_mean(name: str, choices: list[str] | set[str]) -> str:
    """` (did you mean X?)` for the closest of `choices`, or "" when none is close.

    >>> did_you_mean("gruop_size", {"group_size", "clip_low"})
    ' (did you mean group_size?)'
    >>> did_you_mean("zzz", {"group_size"})
    ''
    """
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def init_argument_names(cls: type) -> set[str]:
    """The keyword names `cls(...)` takes: its `__init__`'s and those of the bases its `**kwargs` passes to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def parse_error(message: str, parser=None) -> ConfigError:
    """One `ConfigError` line for a jsonargparse parse error `message` (the original when no key is found in it)."""
    if (bad := _NOT_ACCEPTED.search(message)) and (where := _CLASS_PATH.search(message)):
        key = _PARSER_KEY.search(message)
        group = key.group(1) if key else "model"
        cls = _import(where.group(1))
        hint = did_you_mean(bad.group(1), init_argument_names(cls)) if cls is not None else ""
        return ConfigError(f"{group}.init_args.{bad.group(1)}: {where.group(1)} takes no argument "
                           f"{bad.group(1)!r}{hint}; `--{group}.help {where.group(1).rsplit('.', 1)[-1]}` lists them")
    if (bad := _UNRECOGNIZED.search(message)) is not None and parser is not None:
        flag = bad.group(1).split("=")[0]
        options = {o for action in _all_actions(parser) for o in action.option_strings if o.startswith("--")}
        return ConfigError(f"{flag}: no such option{did_you_mean(flag, options)}; --help lists them")
    return ConfigError(message.strip())  # no key found: jsonargparse's whole message, which names the choices


def _all_actions(parser) -> list:
    actions = list(parser._actions)
    sub = getattr(parser, "_subcommands_action", None)
    for child in (sub.choices.values() if sub is not None else []):
        actions += list(child._actions)
    return actions
