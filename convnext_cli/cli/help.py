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
  form), a choice list longer than a short word goes into the help text as words
  (``auto, table, json ... or html.``) with the option's name as its metavar (Typer still
  checks and completes the choices), and the completion options show no ``<bool>``.

Nothing here imports torch, PIL or numpy.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

# a choice list up to this long stays in the metavar column (<table|json>, <local|ray>)
_SHORT_CHOICES = 14


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
    if len("|".join(choices)) <= _SHORT_CHOICES:
        return
    long_names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    param.metavar = long_names[0].lstrip("-").upper().replace("-", "_")
    help_text = param.help or ""
    words = set(re.findall(r"[\w-]+", help_text))
    if not all(choice in words for choice in choices):
        param.help = f"{_choice_words(choices)}. {help_text}".strip()


class HelpCommand(TyperCommand):
    """A command whose ``--help`` reads well at 80 columns (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)
        for param in self.params:
            _tidy(param)

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
