"""Sparse autoencoders: the interface (base), one file per architecture, the sparse kernels, pure losses and the registry."""
