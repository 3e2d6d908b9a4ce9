"""The reference for flexmodel's safetensors reader and writer, from the format's
description alone: files are put together with struct and json (no
safetensors library), values come from PyTorch and NumPy.

    check_python.py write DIR
        Writes DIR/<name>.safetensors for every dtype of the format and
        DIR/expected.json: for each file its metadata, its tensors in the
        order of their data, and for each tensor its dtype, the LibTorch type
        flexmodel reads it as, its shape, its absolute byte offsets and its
        values (floats as numbers or "nan", "inf", "-inf"; complex as pairs).

    check_python.py read FILE EXPECTED.json
        Parses FILE, which flexmodel wrote, by hand: the header length is a
        multiple of 8 padded with spaces, no key appears twice, __metadata__
        comes first when there is one, the tensors appear in the order written
        with data_offsets contiguous from 0 to the end of the file, and every
        value equals EXPECTED.json's (what flexmodel says it wrote: metadata,
        and tensors as name, dtype, shape, values). Exits 1 listing what differs.
"""

import json
import math
import random
import struct
import sys

import numpy as np
import torch

# dtype: (bytes per element or None for sub-byte, numpy type, LibTorch type read() returns)
DTYPES = {
    "BOOL": (1, "<u1", "Bool"),
    "U8": (1, "<u1", "Byte"),
    "I8": (1, "<i1", "Char"),
    "I16": (2, "<i2", "Short"),
    "U16": (2, "<u2", "Int"),
    "I32": (4, "<i4", "Int"),
    "U32": (4, "<u4", "Long"),
    "I64": (8, "<i8", "Long"),
    "U64": (8, "<u8", "Long"),
    "F16": (2, "<f2", "Half"),
    "BF16": (2, None, "BFloat16"),
    "F32": (4, "<f4", "Float"),
    "F64": (8, "<f8", "Double"),
    "C64": (8, "<c8", "ComplexFloat"),
    "F8_E4M3": (1, None, "Float"),
    "F8_E5M2": (1, None, "Float"),
    "F8_E8M0": (1, None, "Float"),
    "F4": (None, None, "Float"),
    "F6_E2M3": (None, None, "Float"),
}


def encode_float(x):
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def encode(values):
    """A flat list for JSON: ints as they are, floats encoded, complex as pairs."""
    out = []
    for v in values:
        if isinstance(v, complex):
            out.append([encode_float(v.real), encode_float(v.imag)])
        elif isinstance(v, float):
            out.append(encode_float(v))
        else:
            out.append(int(v))
    return out


# The 8-bit floats, decoded from their definitions.
def e4m3fn(b):
    """S.EEEE.MMM, bias 7, no infinity; S.1111.111 is NaN."""
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * (m / 8) * 2.0 ** (1 - 7)
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def e5m2(b):
    """The high byte of an IEEE float16, which NumPy decodes."""
    return float(np.array([b << 8], dtype="<u2").view("<f2")[0])


def e8m0(b):
    return math.nan if b == 0xFF else math.ldexp(1.0, b - 127)


def e2m1(nibble):
    """S.EE.M, bias 1."""
    sign = -1.0 if nibble & 0x8 else 1.0
    e, m = (nibble >> 1) & 0x3, nibble & 0x1
    return sign * (m / 2 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


# Spot checks of the decoders against values the format's papers state.
assert e4m3fn(0x7E) == 448 and e4m3fn(0x01) == 2.0**-9 and e4m3fn(0x38) == 1.0 and math.isnan(e4m3fn(0xFF))
assert e4m3fn(0x08) == 2.0**-6 and math.copysign(1, e4m3fn(0x80)) == -1
assert e5m2(0x7B) == 57344 and e5m2(0x7C) == math.inf and e5m2(0x01) == 2.0**-16 and math.isnan(e5m2(0x7D))
assert [e2m1(n) for n in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def numpy_tensor(name, dtype, values, shape=None):
    array = np.array(values, dtype=DTYPES[dtype][1])
    if shape is not None:
        array = array.reshape(shape)
    return name, dtype, list(array.shape), array.tobytes(), encode(array.flatten().tolist())


def torch_float(name, dtype, tensor):
    if dtype == "BF16":
        raw = tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        raw = tensor.numpy().astype(DTYPES[dtype][1]).tobytes()
    values = tensor.flatten().tolist() if dtype != "BF16" else tensor.float().flatten().tolist()
    return name, dtype, list(tensor.shape), raw, encode(values)


def every_dtype():
    generator = torch.Generator().manual_seed(0)
    inf, nan = math.inf, math.nan
    # Largest elements first, as the reference writer orders them, so that
    # every tensor but the last ones is aligned to its element size.
    tensors = [
        torch_float("doubles", "F64", torch.cat([torch.randn(3, generator=generator, dtype=torch.float64),
                                                 torch.tensor([nan], dtype=torch.float64)])),
        numpy_tensor("longs", "I64", [-(2**63), -1, 0, 2**63 - 1]),
        numpy_tensor("ulongs", "U64", [0, 1, 2**63 - 1]),
        numpy_tensor("complexes", "C64", torch.randn(2, 2, generator=generator, dtype=torch.complex64).numpy()),
        torch_float("floats", "F32", torch.randn(2, 3, generator=generator)),
        numpy_tensor("ints", "I32", [-(2**31), -1, 0, 2**31 - 1]),
        numpy_tensor("uints", "U32", [0, 1, 2**31, 2**32 - 1]),
        torch_float("brains", "BF16", torch.cat([torch.randn(2, 5, generator=generator).flatten(),
                                                 torch.tensor([inf, -0.0, 1e38, nan])]).to(torch.bfloat16)
                    .reshape(2, 7)),
        torch_float("halves", "F16", torch.tensor([0.5, -2.0, 65504.0, 2.0**-24, -0.0, inf, -inf, nan],
                                                  dtype=torch.float16)),
        numpy_tensor("shorts", "I16", [[-32768, -1], [0, 32767]]),
        numpy_tensor("ushorts", "U16", [0, 1, 32767, 32768, 65535]),
        numpy_tensor("mask", "BOOL", [[True, False, True], [False, False, True]]),
        numpy_tensor("bytes", "U8", [0, 1, 127, 128, 255]),
        numpy_tensor("chars", "I8", [-128, -1, 0, 1, 127]),
        ("e4m3", "F8_E4M3", [16, 16], bytes(range(256)), encode([e4m3fn(b) for b in range(256)])),
        ("e5m2", "F8_E5M2", [256], bytes(range(255, -1, -1)), encode([e5m2(b) for b in range(255, -1, -1)])),
        ("e8m0", "F8_E8M0", [4, 64], bytes(range(256)), encode([e8m0(b) for b in range(256)])),
        numpy_tensor("no_rows", "F32", np.zeros((0, 3))),
        numpy_tensor("scalar", "I32", -7),
        numpy_tensor("no_columns", "F16", np.zeros((2, 0))),
    ]
    # F4: two elements a byte, the first in the low nibble; every code once.
    codes = [(5 * i + 3) % 16 for i in range(16)]
    packed = bytes(codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(8))
    tensors.insert(14, ("nibbles", "F4", [4, 4], packed, encode([e2m1(c) for c in codes])))
    return tensors


def write_file(directory, file_name, tensors, metadata=None, header_order=None, expected=None):
    """tensors: (name, dtype, shape, raw bytes, values) in the order of their data."""
    infos, offset = {}, 0
    for name, dtype, shape, raw, _ in tensors:
        infos[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    header = {} if metadata is None else {"__metadata__": metadata}
    for name in header_order or [t[0] for t in tensors]:
        header[name] = infos[name]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(f"{directory}/{file_name}", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors:
            f.write(t[3])
    start = 8 + len(text)
    described = {}
    for name, dtype, shape, raw, values in tensors:
        begin, end = infos[name]["data_offsets"]
        described[name] = {"dtype": dtype, "scalar_type": DTYPES[dtype][2], "shape": shape, "begin": start + begin,
                           "end": start + end, "values": values}
    return {"metadata": metadata or {}, "order": [t[0] for t in tensors], "tensors": described}


def write(directory):
    tensors = every_dtype()
    order = [t[0] for t in tensors]
    random.Random(0).shuffle(order)
    files = {
        "every_dtype.safetensors": write_file(directory, "every_dtype.safetensors", tensors,
                                              {"format": "pt", "written by": "check_python.py ✓"}, order),
        # A float32 at byte 3 of the data: read() copies it, view() cannot.
        "misaligned.safetensors": write_file(directory, "misaligned.safetensors", [
            numpy_tensor("head", "U8", [1, 2, 3]), numpy_tensor("body", "F32", [1.5, -2.25])]),
        "u64_too_large.safetensors": write_file(directory, "u64_too_large.safetensors", [
            numpy_tensor("big", "U64", [0, 2**63 - 1, 2**63])]),
        # Four 6-bit elements in 3 bytes.
        "f6.safetensors": write_file(directory, "f6.safetensors", [("six", "F6_E2M3", [4], b"\x01\x02\x03", [])]),
        "empty.safetensors": write_file(directory, "empty.safetensors", []),
    }
    files["u64_too_large.safetensors"]["tensors"]["big"]["exceeds_int64"] = True
    files["f6.safetensors"]["tensors"]["six"]["undecoded"] = True
    with open(f"{directory}/expected.json", "w") as f:
        json.dump({"files": files}, f, ensure_ascii=False)
    return 0


def decode(dtype, raw):
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4").tolist()
    return np.frombuffer(raw, dtype=DTYPES[dtype][1]).tolist()


def same(got, want):
    if isinstance(want, list):
        return isinstance(got, complex) and same(got.real, want[0]) and same(got.imag, want[1])
    if isinstance(want, str):
        return encode_float(float(got)) == want
    if isinstance(want, float) or isinstance(got, float):
        return float(got) == want and math.copysign(1, float(got)) == math.copysign(1, want)
    return got == want


def read(path, expected_path):
    with open(expected_path, encoding="utf-8") as f:
        expected = json.load(f)
    with open(path, "rb") as f:
        data = f.read()
    errors = []
    if len(data) < 8:
        return [f"{len(data)} bytes, fewer than the 8 of the header length"]
    (n,) = struct.unpack("<Q", data[:8])
    if n % 8 != 0 or 8 + n > len(data):
        return [f"header length {n} is not a multiple of 8 within the file"]
    text = data[8:8 + n].decode("utf-8")
    padded = text.rstrip(" ")
    if len(text) - len(padded) >= 8:
        errors.append(f"{len(text) - len(padded)} spaces of padding, more than 7")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            errors.append(f"a key twice in {keys}")
        return dict(pairs)

    header = json.loads(padded, object_pairs_hook=no_duplicates)
    keys = list(header)
    metadata = expected.get("metadata") or {}
    if metadata:
        if keys[:1] != ["__metadata__"] or header["__metadata__"] != metadata:
            errors.append(f"__metadata__ {header.get('__metadata__')!r} in keys {keys}, expected {metadata!r} first")
        keys = keys[1:]
    elif "__metadata__" in header:
        errors.append(f"__metadata__ {header['__metadata__']!r} where none was given")
    names = [t["name"] for t in expected["tensors"]]
    if keys != names:
        errors.append(f"tensors {keys} in the header, expected {names} in that order")
    offset = 0
    for t in expected["tensors"]:
        info = header.get(t["name"])
        if info is None:
            continue
        size = DTYPES[t["dtype"]][0] * math.prod(t["shape"])
        if info["dtype"] != t["dtype"] or info["shape"] != t["shape"]:
            errors.append(f"{t['name']}: {info['dtype']} {info['shape']}, expected {t['dtype']} {t['shape']}")
        if info["data_offsets"] != [offset, offset + size]:
            errors.append(f"{t['name']}: data_offsets {info['data_offsets']}, expected {[offset, offset + size]}")
            break
        got = decode(t["dtype"], data[8 + n + offset:8 + n + offset + size])
        differ = [i for i, (g, w) in enumerate(zip(got, t["values"])) if not same(g, w)]
        if len(got) != len(t["values"]) or differ:
            errors.append(f"{t['name']}: values differ at {differ[:5]}: {got[:8]} against {t['values'][:8]}")
        offset += size
    if 8 + n + offset != len(data):
        errors.append(f"the tensors end at byte {8 + n + offset}, the file at {len(data)}")
    return errors


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        return write(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "read":
        errors = read(sys.argv[2], sys.argv[3])
        for error in errors:
            print(f"check_python.py: {sys.argv[2]}: {error}", file=sys.stderr)
        return 1 if errors else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
