"""Checks an HDF5 file written by flexmodel::io::HDF5Writer against a manifest.

    check_file.py MANIFEST.json

The manifest (written by tests/test_hdf5.cpp) names the file, the root
attributes and, for every dataset, the raw bytes of what was written in
LibTorch's own representation (bfloat16 as its 16 bits). Every value must read
back bit for bit, with h5py and no plugin; exits 1 listing what differs.
"""

import json
import re
import sys

import h5py
import numpy as np

NUMPY = {
    "bool": np.bool_,
    "uint8": np.uint8,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}


def expected_array(entry):
    raw = np.fromfile(entry["raw"], dtype=np.uint8)
    if entry["torch_dtype"] == "bfloat16":
        bits = raw.view("<u2")
        # float32 with the same sign, exponent and leading mantissa bits: exact.
        values = bits if entry["bits"] else (bits.astype("<u4") << 16).view("<f4")
    else:
        values = raw.view(NUMPY[entry["torch_dtype"]])
    return values.reshape(entry["shape"])


def check(manifest):
    errors = []

    def expect(condition, message):
        if not condition:
            errors.append(message)

    with h5py.File(manifest["file"], "r") as f:
        attrs = f.attrs
        root = manifest["root"]
        expect(attrs.get("layout_version") == 1, f"layout_version {attrs.get('layout_version')!r}")
        expect(attrs.get("flexmodel_version") == root["version"], f"flexmodel_version {attrs.get('flexmodel_version')!r}")
        for name in ("model", "command_line", "tp", "pp", "dp", "steps"):
            expect(name in attrs and attrs[name] == root[name], f"root attribute {name}: {attrs.get(name)!r}, expected {root[name]!r}")
        for name in ("tp", "pp", "dp", "steps"):
            expect(isinstance(attrs.get(name), np.int64), f"root attribute {name} is {type(attrs.get(name))}, expected int64")
        created = attrs.get("created", "")
        expect(isinstance(created, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created), f"created {created!r}")

        present = []
        f["activations"].visititems(lambda name, obj: present.append("/activations/" + name) if isinstance(obj, h5py.Dataset) else None)
        wanted = [entry["path"] for entry in manifest["datasets"]]
        expect(sorted(present) == sorted(wanted), f"datasets {sorted(present)}, expected {sorted(wanted)}")

        for entry in manifest["datasets"]:
            path = entry["path"]
            if path not in f:
                continue
            ds = f[path]
            want = expected_array(entry)
            expect(ds.dtype == want.dtype, f"{path}: dtype {ds.dtype}, expected {want.dtype}")
            expect(ds.shape == want.shape, f"{path}: shape {ds.shape}, expected {want.shape}")
            if ds.dtype == want.dtype and ds.shape == want.shape:
                got = ds[()]
                expect(got.tobytes() == want.tobytes(), f"{path}: values differ at {np.argwhere(got.view(np.uint8) != want.view(np.uint8))[:3].tolist()}")
            expect(ds.attrs.get("module_name") == entry["module_name"], f"{path}: module_name {ds.attrs.get('module_name')!r}")
            expect(ds.attrs.get("hook_type") == entry["hook_type"], f"{path}: hook_type {ds.attrs.get('hook_type')!r}")
            expect(ds.attrs.get("torch_dtype") == entry["torch_dtype"], f"{path}: torch_dtype {ds.attrs.get('torch_dtype')!r}")
            rows = f[ds.attrs["rows_per_step"]][()]
            expect(rows.dtype == np.int64 and rows.tolist() == entry["rows_per_step"], f"{path}: rows_per_step {rows.tolist()}, expected {entry['rows_per_step']}")
            expect(ds.shape[0] == sum(entry["rows_per_step"]), f"{path}: {ds.shape[0]} rows, rows_per_step add up to {sum(entry['rows_per_step'])}")
            if entry["bits"]:
                expect(ds.attrs.get("bfloat16_bits") == 1, f"{path}: bfloat16_bits {ds.attrs.get('bfloat16_bits')!r}")
            else:
                expect("bfloat16_bits" not in ds.attrs, f"{path}: bfloat16_bits set")
            if entry.get("chunks"):
                expect(ds.chunks == tuple(entry["chunks"]), f"{path}: chunks {ds.chunks}, expected {tuple(entry['chunks'])}")
            compression = entry["compression"]
            if compression == "none":
                expect(ds.compression is None, f"{path}: compression {ds.compression}")
            elif compression.startswith("gzip"):
                level = int(compression.split(":")[1]) if ":" in compression else 4
                expect(ds.compression == "gzip" and ds.compression_opts == level and ds.shuffle,
                       f"{path}: compression {ds.compression}:{ds.compression_opts} shuffle {ds.shuffle}, expected {compression} with shuffle")
            else:
                filter_id = {"lz4": 32004, "zst": 32015, "blo": 32001}[compression[:3]]
                filters = ds.id.get_create_plist()
                expect(filters.get_nfilters() == 1 and filters.get_filter(0)[0] == filter_id,
                       f"{path}: filters {[filters.get_filter(i)[0] for i in range(filters.get_nfilters())]}, expected {filter_id}")
    return errors


def main():
    with open(sys.argv[1]) as manifest_file:
        manifest = json.load(manifest_file)
    errors = check(manifest)
    for error in errors:
        print(f"{manifest['file']}: {error}", file=sys.stderr)
    print(f"{manifest['file']}: {'ok' if not errors else f'{len(errors)} problems'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
