"""Trainable model families built from an architecture spec, and the built-in datasets."""
