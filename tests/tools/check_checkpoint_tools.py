"""flex-inspect and flex-dump on Hugging Face checkpoint directories, against the
PyTorch reference's hook captures the fixture script wrote beside them.

    check_checkpoint_tools.py FLEX_INSPECT FLEX_DUMP FIXTURE_DIR MPIRUN...
"""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from make_hf_checkpoints import read_safetensors  # noqa: E402


def run(*args, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def reference(fixtures, name):
    return read_safetensors(os.path.join(fixtures, "hf", name + ".reference.safetensors"))[1]


def check_inspect(inspect, fixtures, scratch):
    directory = os.path.join(fixtures, "hf", "gpt2")
    with open(directory + ".modules.json") as f:
        expected = json.load(f)
    result = run(inspect, directory, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # Hugging Face's named_modules; tokenizer files and generation_config.json
    # beside the weights change nothing. The family's own modules have
    # Hugging Face's class names; layers are flexmodel::parallel's.
    assert [m["name"] for m in report["modules"]] == [name for name, _ in expected["named_modules"]], report
    classes = dict(expected["named_modules"])
    for module in report["modules"]:
        if module["type"].startswith("GPT2"):
            assert module["type"] == classes[module["name"]], module
    assert report["family"] == "gpt2" and report["type"] == "GPT2LMHeadModel", report
    assert report["supports"] == {"data_parallel": True, "tensor_parallel": True, "pipeline_parallel": True}
    assert any("c_attn" in line for line in report["tensor_parallel_plan"]), report["tensor_parallel_plan"]
    assert report["modules"][0]["name"] == "" and "mesh" not in report

    # Given tokens, each module's shapes are those PyTorch's hooks saw.
    tensors = reference(fixtures, "llama")
    tokens = os.path.join(scratch, "tokens.npy")
    np.save(tokens, tensors["tokens"].numpy())
    result = run(inspect, os.path.join(fixtures, "hf", "llama"), "--input", tokens, "--json")
    assert result.returncode == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    for name in ["model.layers.1.mlp.act_fn", "model.layers.0.self_attn.k_proj", "lm_head"]:
        assert modules[name]["outputs"][0]["shape"] == list(tensors["output:" + name].shape), modules[name]
    assert len(modules["model.rotary_emb"]["outputs"]) == 2, modules["model.rotary_emb"]

    # A mesh the config cannot split lists every violation with its fix.
    result = run(inspect, os.path.join(fixtures, "hf", "llama"), "--tp", "3", "--pp", "9")
    assert result.returncode == 0, result.stderr
    assert "cannot run" in result.stdout and "choose pp of at most 4" in result.stdout, result.stdout
    assert "num_key_value_heads (2)" in result.stdout, result.stdout
    assert "tensor-parallel plan:" in result.stdout and "pipeline plan:" in result.stdout, result.stdout
    result = run(inspect, scratch)
    assert result.returncode == 1 and "config.json" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def check_dump(dump, fixtures, scratch, mpirun, name, np_ranks, mesh, hooks, pre_hooks, dtype=None, atol=1e-5):
    tensors = reference(fixtures, name)
    tokens = os.path.join(scratch, name + ".npy")
    np.save(tokens, tensors["tokens"].numpy())
    out = os.path.join(scratch, f"{name}_{np_ranks}.h5")
    args = ["--model", os.path.join(fixtures, "hf", name), "--input", tokens, "--hooks", ",".join(hooks),
            "--pre-hooks", ",".join(pre_hooks), "--out", out, "--batch-size", str(tensors["tokens"].shape[0]),
            "--overwrite", *mesh]
    if dtype is not None:
        args += ["--dtype", dtype]
    command = [dump, *args] if np_ranks == 1 else [*mpirun, "-np", str(np_ranks), dump, *args]
    result = run(*command)
    assert result.returncode == 0, (command, result.stderr)
    with h5py.File(out, "r") as h5:
        assert h5.attrs["model"] == os.path.join(fixtures, "hf", name)
        for kind, names in [("forward", hooks), ("forward_pre", pre_hooks)]:
            for module in names:
                key = ("output:" if kind == "forward" else "input:") + module
                dataset = h5[f"activations/{module}/{kind}"]
                expected = tensors[key]
                stored = dtype or str(expected.dtype).replace("torch.", "")
                assert dataset.attrs["torch_dtype"] == stored, (module, dataset.attrs["torch_dtype"], stored)
                got = torch.from_numpy(dataset[()]).double()
                assert got.shape == expected.shape, (name, module, got.shape, expected.shape)
                error = (got - expected.double()).abs().max().item()
                assert error <= atol, (name, mesh, module, error)
    return out


def main(inspect, dump, fixtures, mpirun):
    with tempfile.TemporaryDirectory() as scratch:
        check_inspect(inspect, fixtures, scratch)

        gpt2_hooks = ["transformer.h.0.mlp", "transformer.h.1.attn.c_attn", "lm_head"]
        gpt2_pre = ["transformer.h.1.attn.c_proj"]
        check_dump(dump, fixtures, scratch, mpirun, "gpt2", 1, [], gpt2_hooks, gpt2_pre)
        # A vocabulary of 101 over tp 2: the logits are whole, 101 wide.
        check_dump(dump, fixtures, scratch, mpirun, "gpt2", 2, ["--tp", "2"], gpt2_hooks, gpt2_pre)
        llama_hooks = ["model.layers.0.self_attn.k_proj", "model.layers.3.mlp", "model.norm", "lm_head"]
        llama_pre = ["model.layers.2.self_attn.o_proj"]
        check_dump(dump, fixtures, scratch, mpirun, "llama", 1, [], llama_hooks, llama_pre)
        # Grouped-query attention over tp 2 in 2 stages, with a data-parallel pair.
        check_dump(dump, fixtures, scratch, mpirun, "llama", 4, ["--tp", "2", "--pp", "2"], llama_hooks, llama_pre)
        check_dump(dump, fixtures, scratch, mpirun, "qwen2", 4, ["--pp", "2", "--dp", "2"],
                   ["model.layers.1.self_attn.q_proj", "lm_head"], [])

        # --dtype auto is what the files store: bf16, as PyTorch ran it.
        bf16_hooks = ["model.layers.1", "lm_head"]
        check_dump(dump, fixtures, scratch, mpirun, "llama_bf16", 1, [], bf16_hooks, [], atol=0)
        check_dump(dump, fixtures, scratch, mpirun, "llama_bf16", 1, [], bf16_hooks, [], dtype="bfloat16", atol=0)
        # Cast to float32, the same weights give float32 activations near the bf16 run's.
        check_dump(dump, fixtures, scratch, mpirun, "llama_bf16", 1, [], bf16_hooks, [], dtype="float32", atol=0.25)
        # A float32 checkpoint cast to bf16 runs in bf16.
        out = check_dump(dump, fixtures, scratch, mpirun, "gpt2", 1, [], ["lm_head"], [], dtype="bfloat16", atol=0.5)
        with h5py.File(out, "r") as h5:
            assert h5["activations/lm_head/forward"].attrs["torch_dtype"] == "bfloat16"

        tokens = os.path.join(scratch, "gpt2.npy")
        common = ["--model", os.path.join(fixtures, "hf", "gpt2"), "--hooks", "lm_head",
                  "--out", os.path.join(scratch, "bad.h5")]
        result = run(dump, *common, "--input", tokens, "--dtype", "int8")
        assert result.returncode == 1 and "--dtype int8: choose auto, float32" in result.stderr, result.stderr
        bad = os.path.join(scratch, "bad_tokens.npy")
        np.save(bad, np.full((2, 3), 101, dtype=np.int64))
        result = run(dump, *common, "--input", bad)
        assert result.returncode == 1 and "outside the 101 rows of the model's embedding 'transformer.wte'" in \
            result.stderr, result.stderr
        result = run(dump, *common, "--input", tokens, "--tp", "3", "--dp", "1")
        assert result.returncode == 1, result.stderr
        assert not os.path.exists(os.path.join(scratch, "bad.h5"))
        result = run(*mpirun, "-np", "3", dump, *common, "--input", tokens, "--tp", "3")
        assert result.returncode != 0 and "tp 3 does not divide n_head (4)" in result.stderr, result.stderr
    print("flex-inspect and flex-dump on checkpoint directories: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
