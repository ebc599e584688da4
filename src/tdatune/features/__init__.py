"""Per-example gradients and seeded random projections."""
