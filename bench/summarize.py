"""Prints the median of every counter of a Google Benchmark JSON report."""
import json
import sys

SKIP = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "aggregate_name",
        "aggregate_unit", "iterations", "real_time", "cpu_time", "time_unit", "family_index",
        "per_family_instance_index"}


def main(path):
    with open(path) as handle:
        report = json.load(handle)
    context = report["context"]
    print(f"# {context.get('host_name', '?')}, {context.get('num_cpus', '?')} CPUs, {context.get('date', '')}")
    for run in report["benchmarks"]:
        if run.get("aggregate_name") != "median":
            continue
        counters = {key: value for key, value in run.items() if key not in SKIP and isinstance(value, (int, float))}
        text = "  ".join(f"{key}={value:.4g}" for key, value in sorted(counters.items()))
        print(f"{run['run_name']:45s} median of {run['repetitions']}: {text}")


if __name__ == "__main__":
    main(sys.argv[1])
