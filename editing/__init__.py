"""fadelab: editing (see docs/architecture.md)."""
