"""The one exception type for errors a user of the store can cause.

`StoreError` carries a one-line message that names the bad value (an entry path, a variant, a
dtype, a schema version) and what would be accepted. The store never `assert`s on input.
"""


class StoreError(Exception):
    """A user-caused store error with a one-line, actionable message."""
