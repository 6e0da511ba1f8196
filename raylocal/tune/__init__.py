"""Ray Tune over per-part learning rates."""
