"""``python -m margin.inference``: run the inference gateway until SIGTERM."""
from margin.common.service import run_service_main
from margin.inference.service import builder_from_env

if __name__ == "__main__":
    run_service_main("inference", builder_from_env())
