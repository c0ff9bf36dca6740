"""The model registry: models, immutable versions, aliases, lineage, artifacts, Triton export."""
