"""The one error type a user sees.

Every problem the user can fix (bad flag, missing file, infeasible budget) is raised as
`FqhwError`; the command prints its message on one line and exits non-zero. Anything else
is a bug and keeps its traceback.
"""


class FqhwError(Exception):
    """A problem with the user's request, with a message that names the fix."""

    exit_code = 2


class InfeasibleError(FqhwError):
    """The allocation problem has no solution under the requested constraints."""

    exit_code = 3


class BitExactError(FqhwError):
    """Two backends disagreed on an integer value: the build must not be trusted."""

    exit_code = 4
