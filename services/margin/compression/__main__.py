"""``python -m margin.compression``: run the compression service until SIGTERM."""
from margin.common.service import run_service_main
from margin.compression.service import builder_from_env

if __name__ == "__main__":
    run_service_main("compression", builder_from_env())
