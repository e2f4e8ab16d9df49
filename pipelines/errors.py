"""The errors a stage raises for a user to read: bad or missing input, refused work. The CLI prints their
message in one line; anything else is a bug and keeps its traceback."""


class StageError(RuntimeError):
    """A stage cannot do what was asked; the message says why and what to do."""
