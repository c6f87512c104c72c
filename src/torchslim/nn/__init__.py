"""Helpers on ``torch.nn`` modules: copying, lookup and replacement by name, masks, bit packing."""
