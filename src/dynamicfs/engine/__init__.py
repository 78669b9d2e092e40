"""Engine layer: the pool handle and the extent store (write, read, rebuild paths)."""
