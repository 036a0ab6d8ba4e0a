"""How ``--help`` reads at any terminal width (80 columns included).

Typer's rich help keeps the source line breaks of a docstring's later paragraphs (and of the
first paragraph in the commands list), so re-wrapping at 80 columns leaves orphan words;
shows an argument's Python type (``<list[str]>``) beside its name, ``{INPUTS}...`` in the
usage line and ``<bool>`` beside ``--install-completion``; and prints a long choice list
``<auto|table|...>`` in a narrow column that can only be cut inside a word.  Here:

- :func:`reflow` joins the lines of each prose paragraph (example lines, which start with
  ``$`` or are indented, stay as they are); every command's help goes through it.
- :class:`HelpCommand` / :class:`HelpGroup` (Typer's ``cls=``): arguments show their name
  only (their help says what they take), the usage line reads ``INPUTS...`` (click's own
  form), every choice list goes into the help text as words (``auto, table, json ... or
  html.``) with the option's name as its metavar (``--dtype DTYPE``, ``--device DEVICE``:
  one way of writing them; Typer still checks and completes the choices), and the
  completion options show no ``<bool>``.
- The middle column stays narrow, so the descriptions keep the room: a number's range
  (``1 to 4096``) and a default (``(default: 5)``) are part of the description, not a
  column or a line of their own, and an on/off pair (``--channels-last/--no-channels-last``)
  shows its first name, the description saying the other.
- A usage error (a bad value, an unknown option, a missing argument) is one ``error:`` line
  on stderr, exit 2, like every other error of the tool, not Typer's boxed panel.

Nothing here imports torch, PIL or numpy.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


def reflow(text: str | None) -> str:
    """``text`` with the single line breaks inside each prose paragraph removed.

    A paragraph keeps its lines where any line after its first is indented or starts with
    ``$`` (an examples block: one command a line)."""
    if not text:
        return ""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    out = []
    for paragraph in paragraphs:
        lines = paragraph.split("\n")
        rest = lines[1:]
        if any(line.startswith((" ", "$")) for line in rest):
            out.append(paragraph)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _choice_words(choices: list[str]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _tidy(param: Any) -> None:
    if isinstance(param, TyperArgument):
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        return
    if not isinstance(param, TyperOption) or param.metavar is not None:
        return
    if param.name in ("install_completion", "show_completion"):
        param.metavar = ""
        return
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or not descriptor.is_choice or not descriptor.choices:
        return
    choices = [str(getattr(c, "value", c)) for c in descriptor.choices]
    long_names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    param.metavar = long_names[0].lstrip("-").upper().replace("-", "_")
    help_text = param.help or ""
    words = set(re.findall(r"[\w-]+", help_text))
    if not all(choice in words for choice in choices):
        param.help = f"{_choice_words(choices)}. {help_text}".strip()


def _inline_extras(param: Any, ctx: Any) -> None:
    """A number's range and the default, said at the end of the description."""
    extras = []
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None:
        words = set(re.findall(r"\d+", param.help or ""))
        if high is None:
            extras.append(f"At least {low}.")
        elif not {str(low), str(high)} <= words:
            extras.append(f"{low} to {high}.")
        param._get_number_range_help_str = lambda: ""
    if param.show_default is not False and not getattr(param, "hidden", False):
        default = param._extract_default_help_str(ctx=ctx)
        shown = isinstance(param.show_default, str) or param.show_default or ctx.show_default
        if default is not None and shown:
            text = param._get_default_string(
                ctx=ctx,
                show_default_is_str=isinstance(param.show_default, str),
                default_value=default,
            )
            if text:
                extras.append(f"(default: {text})")
    if extras:
        param.help = " ".join([(param.help or "").strip(), *extras]).strip()
    param.show_default = False


@contextlib.contextmanager
def _first_names_only(params: list[Any]) -> Iterator[None]:
    """While the help is drawn: on/off pairs show their first name only (the column of
    second names would take the descriptions' room)."""
    kept = [(param, param.secondary_opts) for param in params if param.secondary_opts]
    for param, _names in kept:
        param.secondary_opts = []
    try:
        yield
    finally:
        for param, names in kept:
            param.secondary_opts = names


class HelpCommand(TyperCommand):
    """A command whose ``--help`` reads well at 80 columns (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)
        for param in self.params:
            _tidy(param)
            if isinstance(param, TyperOption) and param.secondary_opts:
                off = param.secondary_opts[0]
                if off not in (param.help or ""):
                    param.help = f"{param.help or ''} {off} turns it off.".strip()
        self._inlined = False

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not self._inlined:
            for param in self.params:
                if isinstance(param, TyperOption):
                    _inline_extras(param, ctx)
            self._inlined = True
        with _first_names_only(self.params):
            super().format_help(ctx, formatter)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class HelpGroup(TyperGroup):
    """The ``convnext`` group: its help and its commands' one-line summaries reflowed, the
    completion options without ``<bool>``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            _tidy(param)
        return params

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Typer's main, with a usage error said in one ``error:`` line (exit 2)."""
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except typer.Abort:
            from convnext_cli.outputs.names import say

            say("aborted")
            sys.exit(1)
        except typer.TyperException as exc:  # click's usage errors (Typer's own click)
            from convnext_cli.outputs.names import say

            message = usage_error(exc)
            if message:  # none: the help was shown (no arguments at all)
                say(f"error: {message}")
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def usage_error(exc: Exception) -> str:
    """``Invalid value for '--top-k' / '-k': 0: a number from 1 to 100000, or all (see
    convnext classify -h)``: click's message on one line, and where the help is."""
    message = " ".join(getattr(exc, "format_message", exc.__str__)().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None or not message:
        return message
    path = ctx.command_path
    if path.startswith("python -m convnext_cli"):
        path = "convnext" + path.removeprefix("python -m convnext_cli")
    return f"{message} (see {path} -h)"
