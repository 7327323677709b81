"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """A mistake in the user's input (file, flag, data) with a message that says how to fix it."""
