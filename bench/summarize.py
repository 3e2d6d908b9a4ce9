"""Prints the median of every counter of Google Benchmark JSON reports."""
import json
import sys

SKIP = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "aggregate_name",
        "aggregate_unit", "iterations", "real_time", "cpu_time", "time_unit", "family_index",
        "per_family_instance_index"}


def summarize(path):
    with open(path) as handle:
        text = handle.read()
    if not text.strip():  # a filter that matched nothing in this program
        return
    report = json.loads(text)
    context = report["context"]
    print(f"# {context.get('host_name', '?')}, {context.get('num_cpus', '?')} CPUs, {context.get('date', '')}")
    for run in report["benchmarks"]:
        if run.get("aggregate_name") != "median":
            continue
        counters = {key: value for key, value in run.items() if key not in SKIP and isinstance(value, (int, float))}
        text = "  ".join(f"{key}={value:.4g}" for key, value in sorted(counters.items()))
        print(f"{run['run_name']:45s} median of {run['repetitions']}: {text}")


if __name__ == "__main__":
    for report_path in sys.argv[1:]:
        summarize(report_path)
