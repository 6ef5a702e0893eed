"""The one error type that a stage shows to its user as a single line (no traceback)."""


class StageError(Exception):
    """A problem with the user's input or params: the message names it, the stage exits 2."""
