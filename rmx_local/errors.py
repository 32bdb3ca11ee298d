"""One exception type for every user-facing failure.

Each error is printed as a single line by the CLI: what went wrong, where (file/field), and how to fix it.
"""


class RmxError(Exception):
    """A user-facing error: `RmxError("recipe.toml: [train] lr must be a number", fix="write lr = 1e-4")`."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message
