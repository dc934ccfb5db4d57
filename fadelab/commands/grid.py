"""`fadelab status`, `fadelab merge` (placeholder until the grid commands land)."""


def register(sub) -> None:
    """Add this module's sub-commands to the `fadelab` parser (none yet)."""
