"""Load time and peak RSS of Hugging Face checkpoints, flexmodel against torch.load,
and the native GPT-2 forward against its TorchScript export.

    /usr/bin/python3 bench/checkpoints.py [BUILD_DIR] [--repetitions N] [--keep]

Writes a GPT-2-small-shaped (fp32, 548 MB) and a 1.1B-parameter LLaMA-shaped (bf16,
2.2 GB, two shards) checkpoint with tests/fixtures/make_hf_checkpoints.py --bench
into BUILD_DIR/bench/checkpoints, then loads each N times in a fresh process per
load, alternating: `bench_checkpoint --load DIR` (flexmodel::hub::load_model) and
Debian's python3-torch running torch.load of the same state dict saved with
torch.save. Both read files the writing left in the page cache. It reports the
medians of the load time and of the peak RSS the load added to its process, and
their ratios; then runs bench_checkpoint's forward benchmark. The checkpoints are
deleted at the end unless --keep.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LOAD = """
import json, resource, sys, time
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
state = torch.load(sys.argv[1])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_before_mb": before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(command):
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    facts["added_mb"] = facts["peak_rss_mb"] - facts["rss_before_mb"]
    return facts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", nargs="?", default="build")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    program = os.path.join(args.build, "bench", "bench_checkpoint")
    folder = os.path.join(args.build, "bench", "checkpoints")
    if not os.path.exists(os.path.join(folder, "llama_1b", "config.json")):
        subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tests", "fixtures", "make_hf_checkpoints.py"),
                        "--bench", folder], check=True)
    try:
        print(f"{'checkpoint':12s} {'loader':12s} {'seconds':>8s} {'added RSS MB':>13s}   (medians of "
              f"{args.repetitions})")
        for name in ["gpt2_small", "llama_1b"]:
            runs = {"flexmodel": [], "torch.load": []}
            for repetition in range(args.repetitions):
                order = ["flexmodel", "torch.load"] if repetition % 2 == 0 else ["torch.load", "flexmodel"]
                for loader in order:
                    if loader == "flexmodel":
                        command = [program, "--load", os.path.join(folder, name)]
                    else:
                        command = ["/usr/bin/python3", "-c", TORCH_LOAD, os.path.join(folder, name + ".pt")]
                    runs[loader].append(measure(command))
            medians = {loader: (statistics.median(r["seconds"] for r in facts),
                                statistics.median(r["added_mb"] for r in facts)) for loader, facts in runs.items()}
            for loader, (seconds, added) in medians.items():
                print(f"{name:12s} {loader:12s} {seconds:8.3f} {added:13.0f}")
            (ours_s, ours_mb), (theirs_s, theirs_mb) = medians["flexmodel"], medians["torch.load"]
            print(f"{name:12s} {'ratio':12s} {ours_s / theirs_s:8.2f} {ours_mb / theirs_mb:13.2f}   "
                  f"(flexmodel / torch.load)")
        with tempfile.TemporaryDirectory() as scratch:
            report = os.path.join(scratch, "forward.json")
            subprocess.run([program, f"--benchmark_repetitions={args.repetitions}",
                            "--benchmark_report_aggregates_only=true", f"--benchmark_out={report}",
                            "--benchmark_out_format=json"], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, FLEXMODEL_BENCH_CHECKPOINTS=folder))
            subprocess.run([sys.executable, os.path.join(ROOT, "bench", "summarize.py"), report], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
