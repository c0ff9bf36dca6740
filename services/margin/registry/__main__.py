"""``python -m margin.registry``: run the registry service until SIGTERM."""
from margin.common.service import run_service_main
from margin.registry.service import builder_from_env

if __name__ == "__main__":
    run_service_main("registry", builder_from_env())
