"""The local cluster: Redis and Margin's services as supervised processes on one machine."""
