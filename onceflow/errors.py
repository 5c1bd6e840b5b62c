"""Errors that reach a user as one line, never as a traceback."""


class UsageError(Exception):
    """A flag, config value or file given by the user is wrong.

    The message names what is wrong and how to fix it; entry points print it as a
    single line and exit with status 2.
    """


class ServiceError(Exception):
    """A service the command needs (a broker, a database, a runner) is missing,
    unreachable or failed to start. The message says what to do; exit status 1."""
