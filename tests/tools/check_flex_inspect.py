"""flex-inspect against PyTorch's own hook captures of the exported model.

    check_flex_inspect.py FLEX_INSPECT FIXTURE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

DTYPES = {torch.float32: "float32", torch.int64: "int64"}


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True)


def check_real_exports(tool, real):
    """Keys of dict outputs, why a module is no hook point, calls PyTorch's hooks
    miss, and a table whose columns fit names longer than any fixed width."""
    def report_of(name):
        result = run(tool, os.path.join(real, f"{name}.pt"), "--input", os.path.join(real, f"{name}.input0.npy"),
                     "--json")
        assert result.returncode == 0, result.stderr
        return {module["name"]: module for module in json.loads(result.stdout)["modules"]}

    modules = report_of("dict_scripted")
    assert [leaf["leaf"] for leaf in modules[""]["outputs"]] == ["['logits']", "['last_hidden_state']"], modules[""]
    assert [leaf["leaf"] for leaf in modules["lm_head"]["outputs"]] == [".logits", ".probs"], modules["lm_head"]

    modules = report_of("encoder_causal_scripted")
    out_proj = modules["encoder.layers.0.self_attn.out_proj"]
    assert not out_proj["hookable"] and "uses only its parameters" in out_proj["why_not_hookable"], out_proj
    assert "container" in modules["encoder.layers"]["why_not_hookable"]
    assert modules["encoder.layers.0.self_attn"]["hookable"]

    modules = report_of("dotforward_scripted")
    assert modules["layers.0.attention"].get("pytorch_hooks_fire") is False, modules["layers.0.attention"]
    assert "pytorch_hooks_fire" not in modules["layers.0.attention.wq"]

    model = os.path.join(real, "encoder_causal_scripted.pt")
    table = run(tool, model, "--input", os.path.join(real, "encoder_causal_scripted.input0.npy"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("MODULE"))
    columns = [header.index(title) for title in ("TYPE", "PARAMETERS", "INPUTS", "OUTPUTS")]
    longest = "encoder.layers.0.self_attn.out_proj"
    assert len(longest) > 27 and columns[0] > len(longest), (columns, header)
    rows = [line for line in lines[lines.index(header) + 1:] if line and not line.startswith(" ")]
    for line in rows[:-1]:
        if line.startswith("not hook points"):
            break
        name = line.split()[0]
        # Each cell starts in its column, after at least one space.
        assert line[columns[0] - 1] == " " and line[columns[0]] != " ", (name, line)
        assert line[columns[1] - 1] == " " and line[columns[1]] != " ", (name, line)
    assert "called as .forward(...)" in run(tool, os.path.join(real, "dotforward_scripted.pt"),
                                            "--input", os.path.join(real, "dotforward_scripted.input0.npy")).stdout


def expected_ops(module):
    """The documented rule, read from the graph in Python: each node but constants, attribute reads,
    child calls and placeholders with a tensor output is <op>.<k> (<op>.<k>.<i> for a node of several outputs), counted
    per op in graph order, and carries its Python name without the .N suffix."""
    counts, ops = {}, []
    for node in module.forward.graph.nodes():
        outputs = list(node.outputs())
        tensors = [i for i, output in enumerate(outputs) if output.type().kind() == "TensorType"]
        if node.kind() in ("prim::Constant", "prim::GetAttr", "prim::CallMethod", "prim::Uninitialized") or not tensors:
            continue
        op = node.kind().split("::")[1]
        occurrence = counts.get(op, 0)
        counts[op] = occurrence + 1
        for i in tensors:
            name = outputs[i].debugName()
            base, _, suffix = name.rpartition(".")
            name = base if base and suffix.isdigit() else ("" if name.isdigit() else name)
            ops.append((f"{op}.{occurrence}" + ("" if len(outputs) == 1 else f".{i}"), name))
    return ops


def check_values(tool, fixtures):
    """--values: every module's value hook points, in the documented order, with the shapes one forward gave."""
    reference = torch.jit.load(os.path.join(fixtures, "reference.pt")).tensors
    for export in ("gpt_scripted", "gpt_traced"):
        model = os.path.join(fixtures, f"{export}.pt")
        result = run(tool, model, "--values", "--input", os.path.join(fixtures, "tokens.npy"), "--json")
        assert result.returncode == 0, result.stderr
        modules = {module["name"]: module for module in json.loads(result.stdout)["modules"]}
        attention = getattr(torch.jit.load(model).layers, "0").attn
        listed = [(value["op"], value["name"]) for value in modules["layers.0.attn"]["values"] if value["op"]]
        assert listed == expected_ops(attention), (export, listed, expected_ops(attention))
        softmax = next(value for value in modules["layers.0.attn"]["values"] if value["op"] == "softmax.0")
        assert softmax["name"] == "probs" and softmax["point"] == "layers.0.attn::softmax.0", softmax
        assert softmax["shape"] == list(reference["forward|layers.0.attn|1"].shape), softmax
        assert softmax["dtype"] == "float32", softmax
        # F.layer_norm is a function the norm's forward calls: its op is the norm's own.
        assert [value["op"] for value in modules["layers.0.ln_1"]["values"]] == ["layer_norm.0"], modules["layers.0.ln_1"]
    # nn.MultiheadAttention computes its pattern inside F.multi_head_attention_forward.
    real = os.path.join(fixtures, "real")
    result = run(tool, os.path.join(real, "encoder_causal_scripted.pt"), "--values", "--json", "--input",
                 os.path.join(real, "encoder_causal_scripted.input0.npy"))
    assert result.returncode == 0, result.stderr
    modules = {module["name"]: module for module in json.loads(result.stdout)["modules"]}
    softmaxes = [value for value in modules["encoder.layers.0.self_attn"]["values"] if value["kind"] == "aten::softmax"]
    assert softmaxes and any("shape" in value for value in softmaxes), softmaxes
    table = run(tool, os.path.join(fixtures, "gpt_scripted.pt"), "--values")
    assert table.returncode == 0 and "values of layers.0.attn:" in table.stdout, table


def main(tool, fixtures):
    model = os.path.join(fixtures, "gpt_scripted.pt")
    tokens = os.path.join(fixtures, "tokens.npy")
    result = run(tool, model, "--input", tokens, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    modules = {module["name"]: module for module in report["modules"]}
    reference = torch.jit.load(os.path.join(fixtures, "reference.pt")).tensors
    checked = 0
    for key, tensor in reference.items():
        parts = key.split("|")
        if len(parts) != 3:
            continue
        kind, name, leaf = parts[0], parts[1], int(parts[2])
        facts = modules[name]["outputs" if kind == "forward" else "inputs"][leaf]
        assert facts["shape"] == list(tensor.shape), (key, facts, tensor.shape)
        assert facts["dtype"] == DTYPES[tensor.dtype], (key, facts, tensor.dtype)
        checked += 1
    assert checked > 40, checked
    eager = dict(torch.jit.load(model).named_modules())
    assert set(modules) == set(eager), set(modules) ^ set(eager)
    for name, module in modules.items():
        for parameter, shape in module["parameters"].items():
            assert list(getattr(eager[name], parameter).shape) == shape, (name, parameter)
    assert modules["layers"]["hookable"] is False and "container" in modules["layers"]["why_not_hookable"]
    assert report["supports"] == {"data_parallel": True, "tensor_parallel": False, "pipeline_parallel": False}

    table = run(tool, model)
    assert table.returncode == 0 and "layers.1.mlp.fc_in" in table.stdout, table

    check_real_exports(tool, os.path.join(fixtures, "real"))
    check_values(tool, fixtures)

    with tempfile.TemporaryDirectory() as scratch:
        floats = os.path.join(scratch, "floats.npy")
        np.save(floats, np.zeros((2, 12), dtype=np.float32))
        garbage = os.path.join(scratch, "garbage.pt")
        with open(garbage, "w") as handle:
            handle.write("not a model")
        for args, needle in [((os.path.join(scratch, "missing.pt"),), "does not exist"),
                             ((garbage,), "is not a TorchScript file"),
                             ((model, "--input", floats), "rejected its input"),
                             ((model, "--input", garbage), "is not a .npy file")]:
            failed = run(tool, *args)
            assert failed.returncode != 0, args
            lines = failed.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], (args, failed.stderr)
    print(f"flex-inspect: {checked} hook-point facts equal PyTorch's, value hook points follow the naming rule, errors "
          "are one line")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
