"""`make bench`: every benchmark, each printing ratios to a reference measured in the same run."""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    print("== worker (bench/worker_bench.py) ==", flush=True)
    importlib.import_module("bench.worker_bench").main(sys.argv[1:])
    # The broker benchmarks take no worker_bench flags (BENCH_ARGS are the Redis worker's).
    print("\n== rabbitmq (bench/rabbitmq_bench.py) ==", flush=True)
    importlib.import_module("bench.rabbitmq_bench").main([])
    print("\n== kafka (bench/kafka_bench.py) ==", flush=True)
    importlib.import_module("bench.kafka_bench").main([])
    print("\n== calls (bench/results_bench.py) ==", flush=True)
    importlib.import_module("bench.results_bench").main([])
    print("\n== CPU-bound, process vs thread mode (bench/cpu_bench.py) ==", flush=True)
    importlib.import_module("bench.cpu_bench").main([])
    try:
        operator_bench = importlib.import_module("bench.operator_bench")
    except ModuleNotFoundError:
        return 0
    print("\n== operator (bench/operator_bench.py) ==", flush=True)
    operator_bench.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
