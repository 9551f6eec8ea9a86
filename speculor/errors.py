"""Errors raised for user mistakes.

`SpeculorError` subclasses `ValueError` so that callers who catch `ValueError` (the convention for bad arguments)
keep working; the CLI and the server turn it into a clear message instead of a traceback.
"""


class SpeculorError(ValueError):
    """A bad input: a model that cannot be loaded, mismatched vocabularies, an out-of-range option."""
