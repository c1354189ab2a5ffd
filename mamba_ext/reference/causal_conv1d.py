"""Placeholder until the family lands; replaced by its real module."""
def causal_conv1d_ref(*args, **kwargs): raise NotImplementedError
def causal_conv1d_update_ref(*args, **kwargs): raise NotImplementedError
