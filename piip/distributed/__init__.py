"""Scaling out: the FSDP2 strategy and its shard units, and the cluster glue (submitit environment,
preemption requeue)."""
