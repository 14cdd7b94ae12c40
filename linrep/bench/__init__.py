"""`linrep bench` (placeholder while being written)."""
