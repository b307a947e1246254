"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class FinetuneError(Exception):
    """A problem the user can fix: bad recipe, missing file, unusable data."""


class RecipeError(FinetuneError):
    """One or more problems in a recipe; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
