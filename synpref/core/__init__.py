"""The core: errors, paths, groups, loading, labels, losses, MLflow, metrics and statistics."""
