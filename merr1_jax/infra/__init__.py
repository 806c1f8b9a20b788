"""Infrastructure: checkpoints, sharding, logging, atomic artifacts, preemption, memory arithmetic."""
