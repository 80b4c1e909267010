"""How choreo's commands draw text for a terminal: colour, box characters, names for display.

How this works: a :class:`Style` says whether to colour (plain ANSI) and whether the stream can
show box-drawing characters; every text renderer (the analyzer's trees, ``choreo trace``,
``choreo top``, the demo) takes one and stays ignorant of terminals. :func:`style_for` picks
the style for a stream the way every command does: colour on a terminal unless ``NO_COLOR`` is
set or ``TERM=dumb``, box characters when the stream's encoding can show them. Nothing here
imports anything heavy, so ``choreo top`` does not pay for networkx::

    style = style_for(sys.stdout, "auto")
    print(style.paint("ok", "green", "bold"), style.branch[1] + "last child")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

__all__ = ["Style", "style_for", "short_name", "plural"]

_ANSI = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


@dataclass(frozen=True)
class Style:
    """How to draw: ``Style(color=True)`` for a terminal, ``Style(unicode=False)`` for ASCII only.

    >>> Style(color=True).paint("ok", "green")
    '\\x1b[32mok\\x1b[0m'
    >>> Style(unicode=False).branch[1]
    '`- '
    """

    color: bool = False
    unicode: bool = True

    def paint(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        codes = ";".join(_ANSI[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"

    @property
    def branch(self) -> tuple[str, str, str, str]:
        """(middle child, last child, continuing line, blank) prefixes."""
        if self.unicode:
            return "├─ ", "└─ ", "│  ", "   "
        return "|- ", "`- ", "|  ", "   "

    @property
    def loop(self) -> str:
        return "↻" if self.unicode else "<-"


def style_for(stream: IO[str], mode: str = "auto", *, to_file: bool = False, sample: str = "├─└│★✗↻█░") -> Style:
    """The style for ``stream`` under ``--color MODE`` (``auto``, ``always`` or ``never``).

    ``to_file``: the text goes to a file (``-o FILE``): no colour in auto mode, and UTF-8.
    ``sample``: characters the output may use; box drawing is kept only if the stream can encode them.

    >>> import io
    >>> style_for(io.StringIO(), "always")
    Style(color=True, unicode=False)
    """
    if mode == "always":
        color = True
    elif mode == "never" or to_file:
        color = False
    else:
        color = stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    encoding = "utf-8" if to_file else (getattr(stream, "encoding", None) or "ascii")
    try:
        sample.encode(encoding)
        unicode = True
    except (UnicodeEncodeError, LookupError):
        unicode = False
    return Style(color=color, unicode=unicode)


def short_name(qualname: str) -> str:
    """A handler's name for display: a function defined inside another loses the ``outer.<locals>.`` part.

    >>> short_name("make_service.<locals>.on_placed"), short_name("Orders.place")
    ('on_placed', 'Orders.place')
    """
    return qualname.rsplit(".<locals>.", 1)[-1]


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "process", "processes") == "1 process"``; ``plural(3, "step") == "3 steps"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
