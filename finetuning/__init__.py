"""fadelab: finetuning (see docs/architecture.md)."""
