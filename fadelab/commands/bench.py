"""`fadelab bench` (placeholder until issue 8 lands)."""


def register(sub) -> None:
    """Add this module's sub-commands to the `fadelab` parser (none yet)."""
