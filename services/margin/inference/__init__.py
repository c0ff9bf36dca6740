"""The inference part: deployments on NVIDIA Triton, Predict, per-tenant quotas and metering, cost-aware routing."""
