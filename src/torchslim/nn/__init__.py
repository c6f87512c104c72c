"""Helpers on ``torch.nn`` modules: copying, lookup and replacement by name, masks, bit packing,
the multi-head attention layer that structured pruning leaves with fewer heads."""
