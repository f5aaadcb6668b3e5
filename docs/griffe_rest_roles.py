"""A griffe extension for the API reference: the library's docstrings use reStructuredText
roles (``:func:`~jpeft.apply```, ``:class:`Transform```), which Markdown would show verbatim.
Each role becomes a code span of its target (the last component for a ``~`` target)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")


def plain(text: str) -> str:
    def code(match: re.Match[str]) -> str:
        target = match["target"]
        if match["tilde"]:
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return ROLE.sub(code, text)


class RestRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
