"""Config parse errors as one line with a did-you-mean (`--model.init_args.gruop_size` -> "did you mean group_size?").

jsonargparse reports a key that a class does not take inside a many-line "Does not validate against any of the
Union subtypes" listing; `parse_error` finds the unknown key in that message, the names the class does take
(`__init__` and the bases its `**kwargs` reach), and the closest one (`difflib`). No framework import: the parser
and the classes are already loaded when it runs.

`early_key_check` is the console script's fast path: before Lightning, torch and transformers load (~7 s of a
typo's ~8 s), it reads the `--model.K` / `--data.K` keys of the command line against the names the component's class
takes, read from the package's source with `ast` (no import of the class's module), and refuses an unknown one with
the same line. It checks only what it can read for sure (`qed_lightning.*` classes, bases it can follow); anything
else is left to the parser.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

from qed_lightning.data.loading import ConfigError

__all__ = ["did_you_mean", "early_key_check", "init_argument_names", "parse_error", "static_init_names"]

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


# -- the fast path: keys checked against the source, before the frameworks load ----------------------------------

_SKIP_KEYS = {"class_path", "init_args", "dict_kwargs", "help"}


def _module_ast(module: str) -> ast.Module | None:
    """The parsed source of a `qed_lightning` module, found by its path in the package (`find_spec` of a submodule
    would run its parent packages, `qed_lightning.modules` among them: torch and Lightning)."""
    root, _, rest = module.partition(".")
    if root != "qed_lightning":
        return None
    base = Path(__file__).resolve().parent.joinpath(*rest.split(".")) if rest else Path(__file__).resolve().parent
    for path in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if path.is_file():
            try:
                return ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, ValueError):
                return None
    return None


def _find_class(module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
    """(module, class node) of `module.name`, following `from X import name` (a package's re-export, a lazy
    `__getattr__`)."""
    tree = _module_ast(module)
    if tree is None or depth > 5:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(node.module, alias.name, depth + 1)
    return None


def static_init_names(class_path: str) -> set[str] | None:
    """The keyword names `class_path(...)` takes, read from source as `init_argument_names` reads them from the class
    (its `__init__`, then the bases its `**kwargs` reaches, left to right); None when that cannot be read for sure.

    >>> "group_size" in static_init_names("qed_lightning.modules.RubricRLModule")
    True
    """
    module, _, name = class_path.rpartition(".")
    found = _find_class(module, name) if module else None
    if found is None:
        return None
    names: set[str] = set()
    pending, seen = [found], set()
    while pending:
        where, node = pending.pop(0)
        if (where, node.name) in seen:
            continue
        seen.add((where, node.name))
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            args = init.args
            names |= {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg != "self"}
            if args.kwarg is None:
                return names
        bases = []
        for base in node.bases:  # a plain name, defined or imported in the class's module
            base_cls = _find_class(where, base.id) if isinstance(base, ast.Name) else None
            if base_cls is None:
                return None  # **kwargs (or no __init__) reaching a class we cannot read
            bases.append(base_cls)
        pending = bases + pending
    return None


def _flag_value(argv: list[str], i: int) -> tuple[str, str | None, int]:
    """(flag, value, next index) of the option at `argv[i]` (`--k v` or `--k=v`)."""
    flag, eq, value = argv[i].partition("=")
    if eq:
        return flag, value, i + 1
    nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    return flag, nxt, i + (2 if nxt is not None else 1)


def early_key_check(argv: list[str], prog: str) -> None:
    """Exit with status 2 and `prog: error: <the parser's one line>` when a `--model.K` or `--data.K` of `argv`
    names no argument of the component's class (module docstring); return otherwise, having loaded nothing heavy."""
    class_paths: dict[str, str | None] = {}
    keys: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            i += 1
            continue
        flag, value, i = _flag_value(argv, i)
        if flag == "--config" and value:
            try:
                import yaml

                with open(value, encoding="utf-8") as fh:
                    config = yaml.safe_load(fh) or {}
            except Exception:  # noqa: BLE001 - the parser reports an unreadable config
                return
            for group in ("model", "data"):
                spec = config.get(group) if isinstance(config, dict) else None
                path = spec.get("class_path") if isinstance(spec, dict) else spec
                if path is not None:
                    class_paths[group] = path if isinstance(path, str) else None
            continue
        group, _, rest = flag[2:].partition(".")
        if group not in ("model", "data"):
            continue
        if rest in ("", "class_path"):
            class_paths[group] = value if value and "." in value and not value.endswith((".yaml", ".yml")) else None
            continue
        key = rest.removeprefix("init_args.").split(".")[0]
        if key not in _SKIP_KEYS:
            keys.append((group, key))
    for group, key in keys:
        class_path = class_paths.get(group)
        names = static_init_names(class_path) if class_path else None
        if names is not None and key not in names:
            short = class_path.rsplit(".", 1)[-1]
            sys.stderr.write(f"{prog}: error: {group}.init_args.{key}: {class_path} takes no argument {key!r}"
                             f"{did_you_mean(key, names)}; `--{group}.help {short}` lists them\n")
            raise SystemExit(2)
