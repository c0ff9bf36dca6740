"""The ``margin`` command line."""
