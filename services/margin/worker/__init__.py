"""Celery workers that run training (and, later, compression) jobs on a device pool."""
