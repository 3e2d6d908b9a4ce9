"""Checks that compressed HDF5 files take the space their chunks store.

    check_size.py UNCOMPRESSED COMPRESSED...

For each file: its size on disk against the bytes its datasets store
(`get_storage_size`, what h5py reads back). Every compressed file must be at
most 5 % over what it stores (plus 64 KiB of metadata) and smaller than the
uncompressed one; exits 1 saying which is not. The figures are printed.
"""

import os
import sys

import h5py


def sizes(path):
    stored = 0

    def visit(_, item):
        nonlocal stored
        if isinstance(item, h5py.Dataset):
            stored += item.id.get_storage_size()

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return os.path.getsize(path), stored


def main():
    raw_size, _ = sizes(sys.argv[1])
    failures = []
    for path in sys.argv[2:]:
        size, stored = sizes(path)
        print(f"{os.path.basename(path)}: {size} bytes on disk, {stored} stored "
              f"(disk/stored {size / stored:.3f}, disk/uncompressed {size / raw_size:.3f})")
        if size > 1.05 * stored + 65536:
            failures.append(f"{path}: {size} bytes on disk for {stored} stored")
        if size >= raw_size:
            failures.append(f"{path}: {size} bytes, the uncompressed file {raw_size}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
