"""fadelab: probes (see docs/architecture.md)."""
