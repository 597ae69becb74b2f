"""The sparsity analyzer: activation sparsity of MLP neurons, structured pruning, polysemantic neurons."""
