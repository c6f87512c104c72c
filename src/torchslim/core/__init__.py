"""The bottom layer: errors, configs and their checks, registries, the technique descriptor, atomic files,
thread counts."""
