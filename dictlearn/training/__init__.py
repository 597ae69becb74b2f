"""The training loop for any architecture: one step, the trainer with its schedule, dead-latent counters, checkpoints and exact resume."""
