"""Checks a file left by a writer process that was killed (or that appended to one).

    check_killed.py FILE KNOWN_STEPS [--exact]
    check_killed.py --list LIST      (LIST: lines "FILE KNOWN_STEPS"; checks them all)

The writer (test_hdf5 --child-writer) wrote the datasets below, step after
step, with values computed from (dataset, step, row, column). The file must
open with plain h5py and its root attribute `steps` must be at least
KNOWN_STEPS, the steps the writer had reported committed before it died; every
dataset must hold exactly the rows of those steps first. Rows past them may
belong to a step the kill cut off. --exact: a closed file, with nothing more.
A missing file is fine only when no step was reported.
"""

import os
import sys

import h5py
import numpy as np

# (path, dtype, rows in step s, trailing shape); keep in step with tests/test_hdf5.cpp.
DATASETS = [
    ("/activations/layers.0.mlp/forward", np.float32, lambda s: 64, (256,)),
    ("/activations/layers.0.attn/forward_pre", np.float32, lambda s: 1 + s % 3, (16,)),
    ("/activations/(root)/forward", np.float16, lambda s: 2, (8,)),
    ("/activations/lm_head.weight/tensor", np.bool_, lambda s: 3, ()),
]


def step_values(k, dtype, s, rows, trailing):
    i = np.arange(rows).reshape((rows,) + (1,) * len(trailing))
    j = np.arange(int(np.prod(trailing))).reshape((1,) + trailing) if trailing else 0
    if dtype == np.bool_:
        return np.broadcast_to((s + i + k) % 2 == 0, (rows,) + trailing)
    return ((s * 7919 + k * 104729 + i * 131 + j) % 2039).astype(dtype)


def check(path, known, exact):
    if not os.path.exists(path):
        return [] if known == 0 and not exact else [f"no file, {known} steps were reported committed"]
    errors = []
    with h5py.File(path, "r") as f:
        steps = int(f.attrs["steps"])
        if steps < known:
            errors.append(f"steps {steps} < {known} reported committed")
        for k, (name, dtype, rows_of, trailing) in enumerate(DATASETS):
            if name not in f:
                if steps > 0:
                    errors.append(f"{name} missing after {steps} steps")
                continue
            ds = f[name]
            rows = f[ds.attrs["rows_per_step"]][()]
            if len(rows) < steps or (exact and len(rows) != steps):
                errors.append(f"{name}: rows_per_step has {len(rows)} entries for {steps} steps")
                continue
            want_rows = [rows_of(s) for s in range(steps)]
            if rows[:steps].tolist() != want_rows:
                errors.append(f"{name}: rows_per_step {rows[:steps].tolist()}, expected {want_rows}")
                continue
            total = sum(want_rows)
            if ds.shape[0] < total or (exact and ds.shape[0] != total):
                errors.append(f"{name}: {ds.shape[0]} rows for {total} committed")
                continue
            if total == 0:
                continue
            got = ds[:total]
            want = np.concatenate([step_values(k, dtype, s, rows_of(s), trailing) for s in range(steps)])
            if got.dtype != want.dtype or not np.array_equal(got, want):
                bad = np.argwhere(got != want)[:3].tolist() if got.shape == want.shape else got.shape
                errors.append(f"{name}: committed rows differ ({bad})")
    return errors


def errors_of(path, known, exact):
    try:
        return check(path, known, exact)
    except Exception as error:  # a file h5py cannot read is the failure this test looks for
        return [f"{type(error).__name__}: {error}"]


def main():
    if sys.argv[1] == "--list":
        with open(sys.argv[2]) as listing:
            files = [(path, int(known), False) for path, known in (line.split() for line in listing if line.strip())]
    else:
        files = [(sys.argv[1], int(sys.argv[2]), "--exact" in sys.argv[3:])]
    failed = 0
    for path, known, exact in files:
        errors = errors_of(path, known, exact)
        for error in errors:
            print(f"{path}: {error}", file=sys.stderr)
        failed += bool(errors)
    if len(files) > 1:
        print(f"{len(files) - failed} of {len(files)} files hold every step reported committed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
