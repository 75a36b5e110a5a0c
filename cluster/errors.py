"""Errors shared by the CLI commands (kept apart so commands import it without the parser)."""


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""
