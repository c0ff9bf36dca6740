"""``python -m margin.budget``: run the budget service until SIGTERM."""
from margin.budget.service import build_budget
from margin.common.service import run_service_main

if __name__ == "__main__":
    run_service_main("budget", build_budget, admin_key_required=True)
