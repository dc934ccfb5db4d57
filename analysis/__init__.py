"""fadelab: analysis (see docs/architecture.md)."""
