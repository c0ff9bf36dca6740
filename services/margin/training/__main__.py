"""``python -m margin.training``: run the training service until SIGTERM."""
from margin.common.service import run_service_main
from margin.training.service import builder_from_env

if __name__ == "__main__":
    run_service_main("training", builder_from_env())
