"""fadelab.models: model families, stable site names, weight deltas, and the organism."""
