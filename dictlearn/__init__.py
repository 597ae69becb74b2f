"""dictlearn: sparse dictionary learning on transformer activations.

Harvest activations from a causal LM at a named hook point, train TopK sparse autoencoders with AuxK
(Gao et al. 2024), and read what the learned features mean. Scripts at the repository root wire these
modules together; nothing here reads ``sys.argv`` or prints on import.
"""
