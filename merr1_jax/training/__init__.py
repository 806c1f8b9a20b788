"""Training: the run's settings and set-up, the stages, the RL experience step, the jitted steps, the trainer."""
