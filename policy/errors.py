"""The one error type configuration loading raises.

Every message names where the problem is, so a user can fix it without a traceback:
``FILE: document N (Kind namespace/name): field.path: problem``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Where:
    """Where a document came from: the file, its 1-based position, and what it declares itself to be."""

    file: str = "<memory>"
    document: int = 1
    kind: str = ""
    name: str = ""  # "namespace/name" for namespaced resources, or "" when unknown

    def describe(self) -> str:
        what = " ".join(p for p in (self.kind, self.name) if p)
        return f"{self.file}: document {self.document}" + (f" ({what})" if what else "")

    def with_resource(self, kind: str, name: str) -> "Where":
        return Where(self.file, self.document, kind, name)


class ConfigError(ValueError):
    """Bad configuration. ``str(err)`` is the full, user-facing message.

    ``path`` is a dotted field path with list indexes, e.g. ``spec.rules[0].to[0].operation.methods``.
    """

    def __init__(self, where: Where, path: str, problem: str):
        self.where = where
        self.path = path
        self.problem = problem
        super().__init__(self.message)

    @property
    def message(self) -> str:
        head = self.where.describe()
        return f"{head}: {self.path}: {self.problem}" if self.path else f"{head}: {self.problem}"


class ConfigErrors(ConfigError):
    """Several independent problems found in one load; ``str`` lists them one per line."""

    def __init__(self, errors: list[ConfigError]):
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.where, first.path, first.problem)

    @property
    def message(self) -> str:  # type: ignore[override]
        return "\n".join(e.message for e in getattr(self, "errors", []))
