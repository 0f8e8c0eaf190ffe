"""One exception type for every bad input, so the CLI can print it and exit non-zero."""


class CompositionError(Exception):
    """A composite cannot be built (or loaded) as asked; the message names the file, tensor or key."""
