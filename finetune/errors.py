"""Errors that reach the user as one line (the CLI prints them without a traceback)."""

import re


class FinetuneError(Exception):
    """A problem the user can fix: bad recipe, missing file, unusable data."""


class ReportedElsewhere(FinetuneError):
    """An error the main process met and reports; the other processes of a run stop with it quietly,
    so that it is printed once, not once per process."""


class RecipeError(FinetuneError):
    """One or more problems in a recipe; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# C0/C1 controls (newline, carriage return, escape...), line and paragraph separators, bidi
# overrides, and the lone surrogates that stand for undecodable bytes in a file name.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe_name(name) -> str:
    """A file name (or any text from outside) fit for a one-line message: characters that could
    break or forge a log line, or recolour a terminal, are written as escapes (`a\\nb.png`)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), str(name))
