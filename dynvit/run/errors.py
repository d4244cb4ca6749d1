"""Command-line errors that end with their own message.

dynvit checks its inputs and raises errors whose message says what to fix. Raised while LightningCLI
builds the model or data, such an error reaches the user wrapped by jsonargparse ("Does not validate
against any of the Union subtypes … Given value: Namespace(...)") under two chained tracebacks.
:func:`run_reporting_errors` prints dynvit's message alone instead, and exits with status 1.

A mistake the parser catches (a mistyped option, a value outside an option's choices) reaches the user as
the whole usage plus jsonargparse's tree of the subtypes it tried; :func:`short_parser_error` turns it
into one line naming the option and the nearest valid one (the CLI's parser prints it and exits with
status 2). ``DYNVIT_TRACEBACK=1`` in the environment shows the full traceback (and jsonargparse's
message) instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

TRACEBACK_ENV = "DYNVIT_TRACEBACK"
_PACKAGE = Path(__file__).resolve().parents[1]
# What jsonargparse raises when a class given by `class_path` fails to build; the real error is its cause.
_UNION_WRAPPER = "Does not validate against any of the Union subtypes"

T = TypeVar("T")


def _raised_by_dynvit(error: BaseException) -> bool:
    """Whether a ``raise`` statement of dynvit's own code raised ``error`` (a message meant for the user),
    rather than the interpreter or a dependency (an ``assert`` or an ``IndexError`` keeps its traceback)."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    if not frames:
        return False
    last = frames[-1]
    return Path(last.filename).resolve().is_relative_to(_PACKAGE) and (last.line or "").lstrip().startswith("raise")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _lightning_config_error(error: BaseException) -> bool:
    """Whether Lightning refused its configuration (``--trainer.devices 0``, an unknown accelerator): a
    message about an option the user gave, whose traceback into Lightning tells them nothing more."""
    # Imported here: this module stays importable without Lightning, which is loaded by the time it raised.
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(error, MisconfigurationException)


def user_error(error: BaseException) -> BaseException | None:
    """The outermost exception in ``error``'s chain that dynvit, or Lightning refusing its configuration,
    raised for the user, if any."""
    return next(
        (e for e in _chain(error) if isinstance(e, Exception) and (_raised_by_dynvit(e) or _lightning_config_error(e))),
        None,
    )


def unwrapped(error: BaseException) -> BaseException:
    """``error`` without jsonargparse's wrapper around a class that failed to build."""
    if str(error).startswith(_UNION_WRAPPER) and error.__cause__ is not None:
        return error.__cause__
    return error


def run_reporting_errors(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call ``fn``; if dynvit raised an error for the user, print its message alone and exit with status 1.

    Other errors (a bug, a dependency's failure) keep their traceback, less jsonargparse's wrapper around
    a class that failed to build.
    With ``DYNVIT_TRACEBACK=1`` every error propagates unchanged.
    """
    if os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        ours = user_error(error)
        inner = unwrapped(error)
        if ours is None and inner is error:
            raise
        sys.stdout.flush()
        if ours is not None:
            print(f"error: {ours}", file=sys.stderr)
        else:
            traceback.print_exception(inner)
        sys.exit(1)


def short_parser_error(message: str, options: Sequence[str] = ()) -> str:
    """One line for an error of the command-line parser (jsonargparse), naming the option and the fix.

    jsonargparse reports a mistyped ``--model.init_args.keep_ration`` or a wrong ``keep_gradient`` value as
    a tree of the Union subtypes it tried, ending in ``Given value: NestedArg(…)``. This finds the option
    the tree is about and what went wrong with it, and suggests the nearest valid option or value.

    Args:
        message: jsonargparse's error message.
        options: The parser's option strings (``--trainer.max_epochs``, …), for suggestions.

    Returns:
        The line (without ``error:``); for a message it does not recognise, the message less its dumps
        of the given value and the subtypes tried.
    """
    if match := re.search(r"unrecognized arguments: (\S+)", message):
        given = match.group(1).split("=", 1)[0]
        return f"unknown option {given}{_did_you_mean(given, options)}"
    if match := re.search(r"Subcommand '(\w+)' does not accept option '(\S+)'", message):
        given = f"--{match.group(2)}"
        return f"{match.group(1)} has no option {given} (from the config file){_did_you_mean(given, options)}"
    if match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
        given, choices = match.group(1), re.findall(r"'([^']*)'", match.group(2))
        return f"no subcommand {given!r}: choose from {', '.join(choices)}{_did_you_mean(given, choices)}"
    path, leaf = _failed_option(message)
    if path is not None and leaf is not None:
        return _describe(path, leaf)
    dumps = ("Given value", "Subtypes:")
    return "\n".join(line for line in message.splitlines() if not line.strip().startswith(dumps)).strip()


@dataclass(frozen=True)
class _Leaf:
    """The innermost finding of a jsonargparse error tree: what failed, and what was given."""

    kind: str  # "unknown" (an option the class does not take), "value" (a wrong value), "class", "file"
    detail: str
    given: str | None
    class_path: str | None


def _failed_option(message: str) -> tuple[str | None, _Leaf | None]:
    """The option (``--model.init_args.keep_gradient``) an error tree is about and its innermost finding.

    The tree nests by indentation: ``Parser key "model":`` > ``Problem with given class_path 'C':`` >
    ``Parser key "keep_gradient":`` > the finding. The deepest finding is the one about the option the
    user typed; shallower ones are the subtypes jsonargparse tried around it (``Expected a <class
    'NoneType'>``, ``Given value: NestedArg(…)``).
    """
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value) of the open nodes
    subtypes: dict[int, str] = {}  # the Union subtypes tried at each depth
    best: tuple[int, str, _Leaf] | None = None
    for line in filter(str.strip, message.splitlines()):
        text = line.strip(" -")
        indent = len(line) - len(line.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := re.match(r'(?:error: )?Parser key "([^"]+)":\s*(.*)', text):
            stack.append((indent, "key", match.group(1)))
            text, indent = match.group(2), indent + 1  # a finding may follow on the same line
        elif match := re.match(r"Problem with given class_path '([^']+)':", text):
            stack.append((indent, "class", match.group(1)))
            continue
        class_path = next((value for _, kind, value in reversed(stack) if kind == "class"), None)
        leaf = None
        if match := re.match(r"Option '([^']+)' is not accepted", text):
            leaf = _Leaf("unknown", match.group(1), None, class_path)
        elif match := re.match(r"Expected a (.+?)\. Got value: (.*)", text):
            leaf = _Leaf("value", match.group(1), match.group(2), class_path)
        elif text.startswith("Subtypes:"):
            subtypes[len(stack)] = text.removeprefix("Subtypes:").strip()
        elif text.startswith("Given value:") and len(stack) in subtypes:
            given = text.removeprefix("Given value:").strip()
            if not given.startswith(("NestedArg(", "{")):  # a class's arguments: the finding is deeper
                leaf = _Leaf("value", subtypes[len(stack)], given, class_path)
        elif match := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", text):
            leaf = _Leaf("class", match.group(2), match.group(1), class_path)
        elif match := re.match(r"Expected a dot import path string: (.*)", text):
            leaf = _Leaf("class", match.group(1), None, None)
        elif match := re.match(r"File does not exist: (.*)", text):
            leaf = _Leaf("file", match.group(1), None, None)
        if leaf is not None and (best is None or len(stack) > best[0]):
            best = (len(stack), _option_path(stack), leaf)
    return (best[1], best[2]) if best else (None, None)


def _option_path(stack: list[tuple[int, str, str]]) -> str:
    """``--model.init_args.keep_gradient`` from the open nodes model > class > keep_gradient."""
    parts = ["init_args" if kind == "class" else value for _, kind, value in stack]
    while parts and parts[-1] == "init_args":
        parts.pop()
    return "--" + ".".join(parts)


def _describe(option: str, leaf: _Leaf) -> str:
    """The line for a finding about ``option``."""
    if leaf.kind == "unknown":
        parent = f"{option}.init_args" if leaf.class_path else option
        owner = leaf.class_path or option
        suggestion = _did_you_mean(leaf.detail, _parameters(leaf.class_path), prefix=f"{parent}.")
        return f"unknown option {parent}.{leaf.detail}: {owner} takes no argument {leaf.detail!r}{suggestion}"
    if leaf.kind == "file":
        return f"{option}: there is no file {leaf.detail}"
    if leaf.kind == "class":
        if leaf.given is None:
            return f"{option} {leaf.detail}: no class of that name; give it by its import path (module.Class)"
        module = sys.modules.get(leaf.given)
        names = [n for n in dir(module) if not n.startswith("_")] if module is not None else []
        return f"{option}: {leaf.given} has no {leaf.detail}" + _did_you_mean(
            leaf.detail, names, prefix=f"{leaf.given}."
        )
    choices = _literal_choices(leaf.detail)
    if choices:
        return f"{option} {leaf.given}: choose from {', '.join(choices)}" + _did_you_mean(str(leaf.given), choices)
    return f"{option} {leaf.given}: expected {_type_names(leaf.detail)}"


def _parameters(class_path: str | None) -> list[str]:
    """The constructor arguments of the class at ``class_path`` (none if it cannot be imported)."""
    if not class_path:
        return []
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _literal_choices(detail: str) -> list[str] | None:
    """The values a jsonargparse message's types allow when every one is a ``Literal[...]`` (or None), else None."""
    literals = re.findall(r"Literal\[([^\]]*)\]", detail)
    others = re.sub(r"(?:typing\.)?Literal\[[^\]]*\]|<class 'NoneType'>|[\[\],\s]", "", detail)
    if not literals or others:
        return None
    try:
        values = [value for literal in literals for value in ast.literal_eval(f"[{literal}]")]
    except (ValueError, SyntaxError):
        return None
    return list(dict.fromkeys(str(v) for v in values))


def _type_names(detail: str) -> str:
    """``[<class 'int'>, <class 'NoneType'>]`` → ``int or null``."""
    names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>|([\w.]+\[[^\]]*\])", detail)
    readable = [(plain or generic).replace("collections.abc.", "").replace("typing.", "") for plain, generic in names]
    readable = ["null" if name == "NoneType" else name for name in readable]
    return " or ".join(dict.fromkeys(readable)) or detail


def _did_you_mean(given: str, valid: Sequence[str], prefix: str = "") -> str:
    """``"; did you mean <prefix>X?"`` for the valid name X nearest ``given``, or nothing (``prefix`` is
    also taken off ``given`` and the valid names before they are compared)."""
    key = given.removeprefix(prefix)
    names = [v.removeprefix(prefix) for v in valid]
    # Case counts in a name but not in its distance from one (ONNX is one letter-case from onnx).
    lowered = {name.lower(): name for name in names}
    nearest = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{lowered[nearest[0]]}?" if nearest else ""
