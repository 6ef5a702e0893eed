"""What runs a stage: the stage harness (params, metrics, restore on failure), the warm
interpreter, worker pools, the C allocator, portable numerics, the code a stage runs, DVC's
experiments and special files. The top layer: it may import every other."""
