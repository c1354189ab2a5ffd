"""Placeholder until the family lands; replaced by its real module."""
def selective_scan_ref(*args, **kwargs): raise NotImplementedError
