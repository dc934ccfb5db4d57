"""fadelab: the CLI and the experiment runner."""
