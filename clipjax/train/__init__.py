"""Training: optimizer and param groups, train state, the jitted step, checkpoints and the loop."""
