"""The cost-budget autoscaler: per serving deployment, replicas = clamp(demand, minimum, affordable)."""
