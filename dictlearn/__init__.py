"""dictlearn: sparse dictionary learning on transformer activations.

Harvest activations from a causal LM at named hook points, train sparse autoencoders of any registered
architecture (TopK, BatchTopK, Matryoshka, ReLU/L1, JumpReLU, gated; TopK transcoders), evaluate them, and
read what the learned features mean. The package is laid out by stage: ``lm`` (models, hooks, text),
``activations`` (live capture, buffer, store), ``sae`` (the interface, one file per architecture, kernels,
losses, registry), ``training``, ``evaluation``, ``formats`` (our run folder and other libraries' files),
``analysis`` (everything that reads features) and ``report`` (tables, plots, pages). Scripts at the repository
root wire these together; nothing here reads ``sys.argv`` or prints on import.

Shape letters, suffixed to tensor names in hot code (``x_BD``, ``pre_acts_BF``):
    B  rows of a batch (activation rows, or windows where a T axis follows)
    T  token positions in a window
    D  the activation width at a hook (``d_in``; ``d_out`` for a transcoder's output)
    F  latents of a dictionary (``num_latents``)
    K  latents kept per row (TopK's ``k``; the padded non-zero count for other architectures)
    R  rows after flattening windows (tokens, or sentences)
    V  vocabulary
Other letters are local to one module and defined in its docstring.
"""
