"""Loading a causal language model, the hook table and the stopped forward, text sources and windows."""
