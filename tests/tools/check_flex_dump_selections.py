"""What flex-dump selects of each hook point (--positions, --heads, --unpack-idx) against PyTorch's own hook
captures sliced with numpy, in one process and with two data-parallel ranks; and --full-forward against the
default, which stops each forward after its last hook.

    check_flex_dump_selections.py FLEX_DUMP FIXTURE_DIR MPIRUN...
"""
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


def datasets(path):
    with h5py.File(path, "r") as h5:
        return {f"{kind}|{name}": h5[f"activations/{name}/{kind}"][()]
                for name in h5["activations"] for kind in h5["activations"][name]}


def main(tool, fixtures, mpirun):
    scripted = os.path.join(fixtures, "gpt_scripted.pt")
    traced = os.path.join(fixtures, "gpt_traced.pt")
    tokens = os.path.join(fixtures, "tokens.npy")
    reference = {key: value.numpy() for key, value in torch.jit.load(os.path.join(fixtures, "reference.pt")).tensors.items()}
    points = ["forward|layers.0.mlp", "forward|layers.2.mlp", "forward_pre|lm_head"]
    common = ["--input", tokens, "--hooks", "layers.*.mlp", "--pre-hooks", "lm_head", "--batch-size", "2"]
    with tempfile.TemporaryDirectory() as scratch:
        # The last position: T times smaller than the whole dump.
        last = os.path.join(scratch, "last.h5")
        result = run(tool, "--model", scripted, *common, "--positions", "last", "--out", last)
        assert result.returncode == 0, result.stderr
        got = datasets(last)
        for point in points:
            whole = reference[point + "|0"]
            assert got[point].shape == (whole.shape[0], 1, whole.shape[2]), (point, got[point].shape)
            np.testing.assert_allclose(got[point], whole[:, -1:], rtol=0, atol=1e-6)

        # Heads 3 and 1 (in that order) of positions 0:2, the head count read from the scripted export.
        heads = os.path.join(scratch, "heads.h5")
        result = run(tool, "--model", scripted, *common, "--positions", "0:2", "--heads", "3,1", "--out", heads)
        assert result.returncode == 0, result.stderr
        got = datasets(heads)
        for point in points:
            whole = reference[point + "|0"]
            rows, time, width = whole.shape
            expected = whole.reshape(rows, time, 4, width // 4)[:, 0:2][:, :, [3, 1]]
            assert got[point].shape == expected.shape, (point, got[point].shape, expected.shape)
            np.testing.assert_allclose(got[point], expected, rtol=0, atol=1e-6)

        # A traced export records no head count: one line asking for it, and no file.
        refused = os.path.join(scratch, "refused.h5")
        result = run(tool, "--model", traced, *common, "--heads", "1", "--out", refused)
        assert result.returncode != 0 and "give --num-heads" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not os.path.exists(refused)
        result = run(tool, "--model", traced, *common, "--heads", "1", "--num-heads", "4", "--out", refused)
        assert result.returncode == 0, result.stderr
        for point in points:
            whole = reference[point + "|0"]
            expected = whole.reshape(*whole.shape[:2], 4, -1)[:, :, 1:2]
            np.testing.assert_allclose(datasets(refused)[point], expected, rtol=0, atol=1e-6)

        # Positions the tensor does not have: the hook named, nothing written.
        outside = os.path.join(scratch, "outside.h5")
        result = run(tool, "--model", scripted, *common, "--positions", "10:20", "--out", outside)
        assert result.returncode != 0, result.stderr
        assert "positions 10:20 is not a non-empty range inside dim 1 of size 12" in result.stderr, result.stderr
        assert "hook on 'layers.0.mlp'" in result.stderr, result.stderr
        assert not os.path.exists(outside)

        # The attention modules' second output, their probabilities [rows, heads, T, T].
        probs = os.path.join(scratch, "probs.h5")
        result = run(tool, "--model", scripted, "--input", tokens, "--hooks", "layers.*.attn", "--unpack-idx", "1",
                     "--out", probs)
        assert result.returncode == 0, result.stderr
        got = datasets(probs)
        for layer in range(3):
            np.testing.assert_allclose(got[f"forward|layers.{layer}.attn"], reference[f"forward|layers.{layer}.attn|1"],
                                       rtol=0, atol=1e-6)

        # Stopping after layer 0 (the default) writes what the whole forwards write.
        early, whole = os.path.join(scratch, "early.h5"), os.path.join(scratch, "whole.h5")
        for out, extra in [(early, []), (whole, ["--full-forward"])]:
            result = run(tool, "--model", scripted, "--input", tokens, "--hooks", "layers.0.mlp", "--batch-size", "1",
                         "--out", out, *extra)
            assert result.returncode == 0, result.stderr
        assert datasets(early).keys() == datasets(whole).keys() == {"forward|layers.0.mlp"}
        np.testing.assert_array_equal(datasets(early)["forward|layers.0.mlp"], datasets(whole)["forward|layers.0.mlp"])
        np.testing.assert_allclose(datasets(early)["forward|layers.0.mlp"], reference["forward|layers.0.mlp|0"],
                                   rtol=0, atol=1e-6)

        # The input ids are /tokens, each step's beside its activations.
        ids = np.load(tokens)
        with h5py.File(last, "r") as h5:
            np.testing.assert_array_equal(h5["tokens"][()], ids)
            assert list(h5["tokens_rows_per_step"][()]) == [2], h5["tokens_rows_per_step"][()]
            assert h5["tokens"].attrs["torch_dtype"] == "int64"

        # --generate 3: greedy tokens as Python's own loop picks them, and each step's newest position of
        # layers.0 as the eager submodules compute it; 4 steps per batch (the last for the last token).
        generated = os.path.join(scratch, "generated.h5")
        result = run(tool, "--model", scripted, "--input", tokens, "--hooks", "layers.0", "--batch-size", "2",
                     "--generate", "3", "--out", generated)
        assert result.returncode == 0, result.stderr
        model = torch.jit.load(scripted)
        sequence = torch.from_numpy(ids)
        with h5py.File(generated, "r") as h5, torch.no_grad():
            assert list(h5["tokens_rows_per_step"][()]) == [2, 2, 2, 2]
            for step in range(4):
                rows = slice(2 * step, 2 * step + 2)
                expected_ids = np.full((2, 15), -1)
                expected_ids[:, :sequence.shape[1]] = sequence.numpy()
                np.testing.assert_array_equal(h5["tokens"][rows], expected_ids)
                hidden = model.embed_tokens(sequence) + model.embed_positions(torch.arange(sequence.shape[1]))
                layer0 = getattr(model.layers, "0")(hidden)[0][:, -1:]
                np.testing.assert_allclose(h5["activations/layers.0/forward"][rows], layer0.numpy(), rtol=0, atol=1e-5)
                sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
        # The same generation under dp 2 and under tp 2 x pp 3 (the weights rebuilt as a ParallelGPT):
        # rank 0 picks each token from the whole logits, every rank goes on with it.
        for mesh in (["--dp", "2"], ["--tp", "2", "--pp", "3"]):
            ranks = str(int(np.prod([int(size) for size in mesh[1::2]])))
            meshed = os.path.join(scratch, "generated_mesh.h5")
            result = run(*mpirun, "-np", ranks, tool, "--model", scripted, "--input", tokens, "--hooks", "layers.0",
                         "--batch-size", "2", "--generate", "3", "--overwrite", "--out", meshed, *mesh)
            assert result.returncode == 0, result.stdout + result.stderr
            with h5py.File(generated, "r") as one, h5py.File(meshed, "r") as many:
                np.testing.assert_array_equal(many["tokens"][()], one["tokens"][()], err_msg=str(mesh))
                np.testing.assert_allclose(many["activations/layers.0/forward"][()],
                                           one["activations/layers.0/forward"][()], rtol=0, atol=1e-5,
                                           err_msg=str(mesh))
        result = run(tool, "--model", scripted, "--input", tokens, "--hooks", "layers.0", "--generate", "3",
                     "--positions", "0:2", "--out", os.path.join(scratch, "generate_refused.h5"))
        assert result.returncode != 0 and "--generate dumps each step's newest position" in result.stderr, result.stderr

        # Value hook points: every layer's attention pattern, the softmax inside its attention, as PyTorch's
        # hook saw it returned; in one process and over two data-parallel ranks.
        for ranks in ([], [*mpirun, "-np", "2"]):
            patterns = os.path.join(scratch, "patterns.h5")
            result = run(*ranks, tool, "--model", scripted, "--input", tokens, "--hooks",
                         "layers.*.attn::softmax.0,layers.0.attn::future", "--batch-size", "2", "--overwrite", "--out",
                         patterns, *(["--dp", "2"] if ranks else []))
            assert result.returncode == 0, result.stdout + result.stderr
            with h5py.File(patterns, "r") as h5:
                assert sorted(h5["activations"]) == ["layers.0.attn::future"] + [
                    f"layers.{i}.attn::softmax.0" for i in range(3)], list(h5["activations"])
                # The causal mask has no batch rows: one [T, T] for the one forward, under dp too.
                future = h5["activations/layers.0.attn::future/forward"][()]
                np.testing.assert_array_equal(future, np.triu(np.ones((12, 12), dtype=bool), 1), err_msg=str(ranks))
                for i in range(3):
                    np.testing.assert_allclose(h5[f"activations/layers.{i}.attn::softmax.0/forward"][()],
                                               reference[f"forward|layers.{i}.attn|1"], rtol=0, atol=1e-6)

        # Two data-parallel ranks write what one process writes.
        shared = os.path.join(scratch, "dp.h5")
        result = run(*mpirun, "-np", "2", tool, "--model", scripted, *common, "--positions", "last", "--out", shared)
        assert result.returncode == 0, result.stderr
        single, parallel = datasets(last), datasets(shared)
        assert single.keys() == parallel.keys()
        for point in single:
            np.testing.assert_allclose(parallel[point], single[point], rtol=0, atol=1e-6)
        with h5py.File(shared, "r") as h5:
            np.testing.assert_array_equal(h5["tokens"][()], ids)
    print("flex-dump selections: positions, heads, unpack-idx, stopped forwards, tokens, generation (one process, "
          "dp 2, tp 2 x pp 3) and dp 2 match PyTorch's")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
