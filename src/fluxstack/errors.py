"""Errors a user can act on, each carrying the exit code the CLI returns.

Exit codes are part of the interface: 0 ok, 1 a check failed (a hash did not
match, a file is missing), 2 usage or environment error (bad manifest, no
token, no space, unreachable endpoint).
"""


class FluxstackError(Exception):
    """An error whose message tells the user what went wrong and what to do."""

    exit_code = 2


class UsageError(FluxstackError):
    """Wrong input or environment: bad manifest, missing token, no disk space."""

    exit_code = 2


class CheckFailed(FluxstackError):
    """A verification failed: a file is missing or its bytes are not the expected ones."""

    exit_code = 1
