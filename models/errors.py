"""The one exception type for errors a user can cause.

`FadelabError` carries a one-line message that names the bad value and what would be accepted;
the CLI prints it as `error: <message>` without a stack trace. Library code raises it (or a
subclass) for bad input, never `assert`.
"""


class FadelabError(Exception):
    """A user-caused error with a one-line, actionable message."""
