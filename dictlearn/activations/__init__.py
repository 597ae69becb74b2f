"""Activations at hook points: live capture, the shuffled buffer, the sharded store, and the source that feeds training."""
