"""HDF5Writer beside h5py and dd on the same bytes, fsync included.

    /usr/bin/python3 bench/hdf5_vs_h5py.py BUILD_DIR/bench/bench_hdf5 [--repetitions 5] [--dir DIR] [--no-gzip]

The workload: 20 steps x 24 hooks of [4,128,768] float32 (755 MB), one
dataset per hook at /activations/layers.N.{attn,mlp}/forward, chunks of one
step. Each repetition runs every contender once, in a rotating order, on the
same arrays (numpy, seeded, saved once to DIR/data.bin for bench_hdf5):
  flexmodel        bench_hdf5's BM_Write (HDF5Writer: write() x 480, close())
  h5py             resize + slice assignment per step, close(), os.fsync
  dd               dd if=/dev/zero bs=1.5MiB count=480 conv=fsync
gzip rows use level 4 with shuffle on both sides (the same file format).
Prints the medians, GB/s and the ratios, then bench_hdf5's BM_Enqueue: what
write() costs the caller while the disk keeps up.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time

import h5py
import numpy as np

STEPS, HOOKS, SHAPE = 20, 24, (4, 128, 768)
NAMES = [f"layers.{hook // 2}.{'attn' if hook % 2 == 0 else 'mlp'}" for hook in range(HOOKS)]


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def flexmodel_seconds(bench, data_path, directory, compression):
    name = {"none": "none", "gzip:4": "gzip4"}[compression]
    env = dict(os.environ, FLEXMODEL_BENCH_DATA=data_path, FLEXMODEL_BENCH_DIR=directory)
    out = subprocess.run([bench, f"--benchmark_filter=^BM_Write/{name}/", "--benchmark_format=json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)["benchmarks"][0]
    assert result["time_unit"] == "ms", result
    return result["real_time"] / 1e3


def h5py_seconds(data, directory, compression):
    path = os.path.join(directory, "h5py_bench.h5")
    options = dict(compression="gzip", compression_opts=4, shuffle=True) if compression == "gzip:4" else {}
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        datasets = [f.create_dataset(f"activations/{name}/forward", shape=(0,) + SHAPE[1:], maxshape=(None,) + SHAPE[1:],
                                     chunks=SHAPE, dtype="<f4", **options) for name in NAMES]
        for step in range(STEPS):
            for hook, dataset in enumerate(datasets):
                dataset.resize(dataset.shape[0] + SHAPE[0], axis=0)
                dataset[-SHAPE[0]:] = data[step, hook]
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    os.remove(path)
    return elapsed


def dd_seconds(directory, total_bytes):
    path = os.path.join(directory, "dd_bench.bin")
    block = SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={total_bytes // block}", "conv=fsync",
                    "status=none"], check=True)
    elapsed = time.perf_counter() - start
    os.remove(path)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="the bench_hdf5 program")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the files go (default: a new folder in the temporary folder)")
    parser.add_argument("--no-gzip", action="store_true", help="skip the gzip rows (they take minutes)")
    args = parser.parse_args()

    directory = args.dir or tempfile.mkdtemp(prefix="flexmodel_hdf5_bench_")
    data = np.random.default_rng(0).standard_normal((STEPS, HOOKS) + SHAPE, dtype=np.float32)
    data_path = os.path.join(directory, "data.bin")
    data.tofile(data_path)
    try:
        compare(args, directory, data, data_path)
    finally:
        os.remove(data_path)
        if args.dir is None:
            os.rmdir(directory)


def compare(args, directory, data, data_path):
    total = data.nbytes

    contenders = [("flexmodel none", lambda: flexmodel_seconds(args.bench, data_path, directory, "none")),
                  ("h5py none", lambda: h5py_seconds(data, directory, "none")),
                  ("dd", lambda: dd_seconds(directory, total))]
    if not args.no_gzip:
        contenders += [("flexmodel gzip:4", lambda: flexmodel_seconds(args.bench, data_path, directory, "gzip:4")),
                       ("h5py gzip:4", lambda: h5py_seconds(data, directory, "gzip:4"))]
    times = {name: [] for name, _ in contenders}
    cpu = {name: [] for name, _ in contenders}
    for repetition in range(args.repetitions):
        order = contenders[repetition % len(contenders):] + contenders[:repetition % len(contenders)]
        for name, run in order:
            before = cpu_seconds()
            times[name].append(run())
            cpu[name].append(cpu_seconds() - before)
        print(f"repetition {repetition + 1}/{args.repetitions}: " +
              ", ".join(f"{name} {times[name][-1]:.3f} s" for name, _ in contenders), flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{total / 1e6:.0f} MB in {STEPS} steps x {HOOKS} datasets of {list(SHAPE)} float32, "
          f"{args.repetitions} repetitions, {os.cpu_count()} cores")
    # CPU seconds (this process and its children) tell the work apart from waiting for cores.
    print(f"{'contender':<18} {'median s':>9} {'GB/s':>7} {'cpu s':>7}   all s")
    for name, _ in contenders:
        print(f"{name:<18} {median[name]:>9.3f} {total / median[name] / 1e9:>7.3f} {statistics.median(cpu[name]):>7.2f}   "
              + " ".join(f"{value:.3f}" for value in times[name]))
    print(f"\nflexmodel / h5py, none:   {median['h5py none'] / median['flexmodel none']:.2f}x the throughput")
    print(f"flexmodel / dd:           {median['dd'] / median['flexmodel none']:.2f}x the throughput")
    if not args.no_gzip:
        print(f"flexmodel / h5py, gzip:4: {median['h5py gzip:4'] / median['flexmodel gzip:4']:.2f}x the throughput")

    env = dict(os.environ, FLEXMODEL_BENCH_DATA=data_path, FLEXMODEL_BENCH_DIR=directory)
    out = subprocess.run([args.bench, "--benchmark_filter=^BM_Enqueue/", "--benchmark_format=json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    enqueue = json.loads(out)["benchmarks"][0]
    print(f"\nwrite() as the caller sees it (disk caught up): {enqueue['real_time']:.1f} {enqueue['time_unit']} "
          f"for 24 snapshots and end_step, {enqueue['us_per_write']:.2f} us per write()")


if __name__ == "__main__":
    main()
