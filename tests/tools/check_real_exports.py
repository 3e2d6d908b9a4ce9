"""flex-dump on the real-export fixtures against PyTorch's own hook captures.

    check_real_exports.py FLEX_DUMP FIXTURE_DIR MPIRUN...

For every FIXTURE_DIR/real/NAME.json (written by tests/fixtures/make_fixtures.py)
with exactly one input, and each of its one-input "variants", runs
    FLEX_DUMP --model NAME.pt --input INPUT --hooks "**" --pre-hooks "**" --out TMP.h5 --batch-size ROWS
so that one forward sees every row, then checks that
  - every module in fired_forward has activations/<module>/forward equal to the
    reference's "forward|<module>|0" (same shape, rtol 0, atol 1e-6),
  - every module in fired_pre with a "forward_pre|<module>|0" key has
    activations/<module>/forward_pre equal to it,
  - any other dataset belongs to a module in never_fired (printed as an extra).
The root module is "" in the fixtures and "(root)" in the file. Then, for the
fixtures in DATA_PARALLEL, `MPIRUN -np 2 FLEX_DUMP ... --dp 2` must write what one
process writes at the same --batch-size, dataset by dataset, with one and with two
rows per rank: tensors without a batch dimension (a position embedding of
arange(T)[None], rotary tables) are written once per step, never once per rank,
also when the two ranks' rows are identical. Prints one line per run and exits
non-zero if any run failed.
"""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

ATOL = 1e-6


def dataset_name(module: str) -> str:
    return module if module else "(root)"


def module_name(dataset: str) -> str:
    return "" if dataset == "(root)" else dataset


# (fixture, input file suffix, global batch sizes) run under two data-parallel ranks.
DATA_PARALLEL = [("nobatch_traced", "input0.npy", (2, 4)), ("nobatch_scripted", "input0.npy", (2, 4)),
                 ("nobatch_traced", "rows2.npy", (2,)), ("nobatch_scripted", "rows2.npy", (2,)),
                 ("tied_traced", "input0.npy", (2,)), ("dict_scripted", "input0.npy", (2,))]


def dump(tool: str, model: str, inputs: str, out: str, batch=None, launcher=(), extra=()):
    rows = np.load(inputs, mmap_mode="r").shape[0]
    command = [*launcher, tool, "--model", model, "--input", inputs, "--hooks", "**", "--pre-hooks", "**",
               "--out", out, "--batch-size", str(batch or rows), *extra]
    try:
        return subprocess.run(command, capture_output=True, text=True)
    except OSError as error:   # FLEX_DUMP missing or not executable
        return subprocess.CompletedProcess(command, 127, "", str(error))


def compare(h5: h5py.File, path: str, expected: torch.Tensor):
    """A list of problems (empty when the dataset equals the reference)."""
    if path not in h5:
        return [f"{path}: missing (PyTorch's hook fired)"]
    got = h5[path][()]
    want = expected.numpy()
    if got.shape != want.shape:
        return [f"{path}: shape {got.shape}, PyTorch {want.shape}"]
    if want.size == 0:
        return []
    difference = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if not np.all(difference <= ATOL):   # NaN fails too
        return [f"{path}: max |difference| {np.nanmax(difference):.3g} > {ATOL}"
                + (" (NaN)" if np.isnan(difference).any() else "")]
    return []


def check_file(h5: h5py.File, summary: dict, reference: dict):
    """(problems, extras, checked) for one flex-dump file against one reference."""
    problems, extras, checked = [], [], 0
    expected = {}  # (module, hook type) -> reference tensor
    for module in summary["fired_forward"]:
        key = f"forward|{module}|0"
        if key in reference:   # a module whose output holds no tensor has no key
            expected[(module, "forward")] = reference[key]
    for module in summary["fired_pre"]:
        key = f"forward_pre|{module}|0"
        if key in reference:
            expected[(module, "forward_pre")] = reference[key]
    for (module, kind), tensor in expected.items():
        found = compare(h5, f"activations/{dataset_name(module)}/{kind}", tensor)
        problems += found
        checked += not found
    never_fired = set(summary["never_fired"])
    for dataset in h5.get("activations", {}):
        for kind in h5["activations"][dataset]:
            module = module_name(dataset)
            if (module, kind) in expected:
                continue
            if module in never_fired:
                extras.append(f"{dataset}/{kind}")
            elif kind in ("forward", "forward_pre"):
                problems.append(f"activations/{dataset}/{kind}: PyTorch's {kind} hook on '{module}' "
                                "fired but saw no tensor")
            else:
                problems.append(f"activations/{dataset}/{kind}: not written by PyTorch's hooks, and "
                                f"'{module}' is not in never_fired")
    return problems, extras, checked


def check_run(tool: str, real: str, scratch: str, name: str, summary: dict, label: str, inputs: list,
              reference_file: str):
    """One flex-dump run; returns (ok, line)."""
    if len(inputs) != 1:
        return True, f"{label}: skipped ({len(inputs)} inputs)"
    out = os.path.join(scratch, f"{label}.h5")
    result = dump(tool, os.path.join(real, f"{name}.pt"), os.path.join(real, inputs[0]), out)
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        return False, f"{label}: FAIL flex-dump exited {result.returncode}: {message}"
    reference = torch.jit.load(os.path.join(real, reference_file)).tensors
    with h5py.File(out, "r") as h5:
        problems, extras, checked = check_file(h5, summary, reference)
    extra = f"; extra (never fired in PyTorch): {', '.join(extras)}" if extras else ""
    if problems:
        return False, f"{label}: FAIL {len(problems)} mismatch(es), {checked} equal{extra}\n    " + \
            "\n    ".join(problems)
    return True, f"{label}: ok, {checked} datasets equal PyTorch's hooks{extra}"


def check_data_parallel(tool: str, mpirun: list, real: str, scratch: str, name: str, suffix: str, batch: int):
    """One process against two data-parallel ranks at the same global batch; returns (ok, line)."""
    label = f"{name}.{suffix[:-4]} --dp 2 --batch-size {batch}"
    model, inputs = os.path.join(real, f"{name}.pt"), os.path.join(real, f"{name}.{suffix}")
    single, parallel = os.path.join(scratch, "single.h5"), os.path.join(scratch, "parallel.h5")
    for path in (single, parallel):
        if os.path.exists(path):
            os.remove(path)
    for out, launcher, extra in ((single, (), ()), (parallel, (*mpirun, "-np", "2"), ("--dp", "2"))):
        result = dump(tool, model, inputs, out, batch, launcher, extra)
        if result.returncode != 0:
            message = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            return False, f"{label}: FAIL flex-dump exited {result.returncode}: {message}"
    problems, checked = [], 0
    with h5py.File(single, "r") as one, h5py.File(parallel, "r") as two:
        paths = lambda h5: {f"{d}/{k}" for d in h5["activations"] for k in h5["activations"][d]}
        if paths(one) != paths(two):
            problems.append(f"datasets differ: {sorted(paths(one) ^ paths(two))}")
        for path in sorted(paths(one) & paths(two)):
            a, b = one["activations"][path][()], two["activations"][path][()]
            if a.shape != b.shape:
                problems.append(f"{path}: one process {a.shape}, two ranks {b.shape}")
            # A matrix product over another number of rows may round differently.
            elif not np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-5, atol=ATOL):
                problems.append(f"{path}: values differ by up to {np.abs(a - b).max():.3g}")
            else:
                checked += 1
    if problems:
        return False, f"{label}: FAIL\n    " + "\n    ".join(problems)
    return True, f"{label}: ok, {checked} datasets equal one process's"


def main(tool: str, fixtures: str, mpirun: list) -> int:
    real = os.path.join(fixtures, "real")
    names = sorted(entry[:-len(".json")] for entry in os.listdir(real) if entry.endswith(".json"))
    if not names:
        print(f"check_real_exports: no NAME.json in {real}")
        return 1
    failed, runs_done = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            with open(os.path.join(real, f"{name}.json")) as handle:
                summary = json.load(handle)
            runs = [(name, summary["inputs"], f"{name}.reference.pt")]
            for variant, spec in summary.get("variants", {}).items():
                runs.append((f"{name}.{variant}", spec["inputs"], spec["reference"]))
            for label, inputs, reference_file in runs:
                ok, line = check_run(tool, real, scratch, name, summary, label, inputs, reference_file)
                print(line, flush=True)
                runs_done += 1
                if not ok:
                    failed.append(label)
        for name, suffix, batches in DATA_PARALLEL:
            for batch in batches:
                ok, line = check_data_parallel(tool, mpirun, real, scratch, name, suffix, batch)
                print(line, flush=True)
                runs_done += 1
                if not ok:
                    failed.append(line.split(":")[0])
    if failed:
        print(f"check_real_exports: {len(failed)} runs differ: {', '.join(failed)}")
        return 1
    print(f"check_real_exports: {len(names)} fixtures ({runs_done} runs) equal PyTorch's hooks and one process")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
