"""fadelab: store (see docs/architecture.md)."""
