"""`fadelab finetune` (placeholder until its room lands)."""


def register(sub) -> None:
    """Add this module's sub-commands to the `fadelab` parser (none yet)."""
