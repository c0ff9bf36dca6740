"""Budgets: tenants and API keys now; budgets, the ledger and the autoscaler arrive with issue #6."""
