"""Errors a user can fix. Each carries one line per problem; the CLI prints them and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refusal the user can act on (a file, a folder, a token, a setting)."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class RecipeError(UserError):
    """A recipe field, or what it names (a source, a dataset, a folder), is not what the merge needs."""


class HubError(UserError):
    """The Hugging Face Hub refused a request (a token without write access, a repo of someone else)."""
