"""Evaluating dictionaries: reconstruction and sparsity metrics, spliced LM loss and KL, absorption, comparisons."""
