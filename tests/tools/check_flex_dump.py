"""flex-dump against PyTorch's own hook captures, single process and under mpirun.

    check_flex_dump.py FLEX_DUMP FIXTURE_DIR MPIRUN...
"""
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch


def run(*args, timeout=None):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def ends_every_rank(mpirun, tool, args, needle):
    """An error only rank 0 meets (its output file, its compression filter) ends every rank within seconds."""
    start = time.monotonic()
    try:
        failed = run(*mpirun, "-np", "2", tool, *args, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args}: still running after 60 s: the ranks without the error hang")
    elapsed = time.monotonic() - start
    assert failed.returncode != 0 and needle in failed.stderr, (args, failed.stderr)
    return elapsed


def main(tool, fixtures, mpirun):
    model = os.path.join(fixtures, "gpt_scripted.pt")
    tokens = os.path.join(fixtures, "tokens.npy")
    reference = torch.jit.load(os.path.join(fixtures, "reference.pt")).tensors
    common = ["--model", model, "--input", tokens, "--hooks", "layers.*.mlp,embed_tokens", "--pre-hooks", "lm_head"]
    with tempfile.TemporaryDirectory() as scratch:
        single = os.path.join(scratch, "single.h5")
        result = result_single = run(tool, *common, "--out", single, "--batch-size", "1")
        assert result.returncode == 0, result.stderr
        assert "/activations/layers.1.mlp/forward" in result.stdout, result.stdout
        with h5py.File(single, "r") as h5:
            checked = 0
            for name, kind, key in [("layers.0.mlp", "forward", "forward|layers.0.mlp|0"),
                                    ("layers.2.mlp", "forward", "forward|layers.2.mlp|0"),
                                    ("embed_tokens", "forward", "forward|embed_tokens|0"),
                                    ("lm_head", "forward_pre", "forward_pre|lm_head|0")]:
                dataset = h5[f"activations/{name}/{kind}"]
                expected = reference[key].numpy()
                assert dataset.shape == expected.shape, (name, dataset.shape, expected.shape)
                np.testing.assert_allclose(dataset[()], expected, rtol=0, atol=1e-6)
                assert dataset.attrs["module_name"] == name and dataset.attrs["hook_type"] == kind
                assert dataset.attrs["torch_dtype"] == "float32"
                checked += 1
            assert len(h5["activations"]) == 5, list(h5["activations"])

        # Two data-parallel ranks write what one process writes.
        parallel = os.path.join(scratch, "parallel.h5")
        result = run(*mpirun, "-np", "2", tool, *common, "--out", parallel, "--batch-size", "2", "--dp", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        with h5py.File(single, "r") as one, h5py.File(parallel, "r") as two:
            for name in ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp", "embed_tokens"]:
                path = f"activations/{name}/forward"
                np.testing.assert_allclose(two[path][()], one[path][()], rtol=0, atol=1e-6)
            assert two.attrs["dp"] == 2

        # A tensor- and data-parallel mesh (2, 1, 2) and a pipeline (1, 3, 1) over the
        # same weights rebuilt as a ParallelGPT: TP-sharded activations (fc_in's
        # output, fc_out's input) are gathered, every stage's reach rank 0.
        wide = ["--hooks", "layers.*.mlp,layers.*.mlp.fc_in,layers.*.attn,embed_tokens",
                "--pre-hooks", "lm_head,layers.*.mlp.fc_out"]
        flat = dict(zip(common[::2], common[1::2]))
        flat.update(dict(zip(wide[::2], wide[1::2])))
        flat = [item for pair in flat.items() for item in pair]
        whole = os.path.join(scratch, "whole.h5")
        result = run(tool, *flat, "--out", whole, "--batch-size", "2")
        assert result.returncode == 0, result.stderr
        for tp, pp, dp in [(2, 1, 2), (1, 3, 1)]:
            meshed = os.path.join(scratch, f"mesh_{tp}{pp}{dp}.h5")
            result = run(*mpirun, "-np", str(tp * pp * dp), tool, *flat, "--out", meshed, "--batch-size", "2",
                         "--tp", str(tp), "--pp", str(pp), "--dp", str(dp))
            assert result.returncode == 0, result.stdout + result.stderr
            with h5py.File(whole, "r") as one, h5py.File(meshed, "r") as many:
                names = sorted(f"{name}/{kind}" for name in one["activations"] for kind in one["activations"][name])
                assert names == sorted(f"{name}/{kind}" for name in many["activations"]
                                       for kind in many["activations"][name]), (tp, pp, dp)
                assert len(names) == 14, names
                for name in names:
                    np.testing.assert_allclose(many["activations"][name][()], one["activations"][name][()],
                                               rtol=0, atol=1e-5, err_msg=f"{name} under ({tp}, {pp}, {dp})")
                assert (many.attrs["tp"], many.attrs["pp"], many.attrs["dp"]) == (tp, pp, dp)

        # Bad input: one line on stderr, non-zero exit, and no file left behind.
        floats = os.path.join(scratch, "floats.npy")
        np.save(floats, np.zeros((2, 12), dtype=np.float32))
        for args, needle in [(["--hooks", "layer.*.mlp"], "matches no module"),
                             (["--input", floats], "rejected its input"),
                             (["--model", os.path.join(scratch, "missing.pt")], "does not exist"),
                             (["--tp", "2"], "mpirun started 1 ranks, not a multiple of --tp 2")]:
            out = os.path.join(scratch, "bad.h5")
            replaced = dict(zip(common[::2], common[1::2]))
            replaced.update(dict(zip(args[::2], args[1::2])))
            flat = [item for pair in replaced.items() for item in pair]
            failed = run(tool, *flat, "--out", out)
            lines = failed.stderr.strip().splitlines()
            assert failed.returncode != 0 and len(lines) == 1 and needle in lines[0], (args, failed.stderr)
            assert not any(name.startswith("bad.h5") for name in os.listdir(scratch)), os.listdir(scratch)

        # Patterns select hook points: a wildcard skips containers and modules the
        # forward never calls (--dry-run says which); a container named exactly,
        # or a hook point named exactly that never fires, is an error and no file.
        real = os.path.join(fixtures, "real")
        encoder = ["--model", os.path.join(real, "encoder_causal_scripted.pt"),
                   "--input", os.path.join(real, "encoder_causal_scripted.input0.npy")]
        dry = run(tool, *encoder, "--hooks", "**", "--out", os.path.join(scratch, "dry.h5"), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "hook   (root)" in dry.stdout and "hook   encoder.layers.0.self_attn " in dry.stdout, dry.stdout
        assert "skip   encoder.layers.0.self_attn.out_proj" in dry.stdout and "skip   encoder.layers " in dry.stdout
        assert not os.path.exists(os.path.join(scratch, "dry.h5"))
        encoder_fast = ["--model", os.path.join(real, "encoder_scripted.pt"),
                        "--input", os.path.join(real, "encoder_scripted.input0.npy")]
        for args, needle in [(encoder + ["--hooks", "encoder.layers"], "is a container with no forward method"),
                             (encoder + ["--hooks", "encoder.layers.0.self_attn.out_proj"],
                              "'encoder.layers.0.self_attn' uses only its parameters"),
                             (encoder_fast + ["--hooks", "layers.0.linear1"], "did not fire in the first forward"),
                             (encoder_fast + ["--hooks", "layers.*.linear*"], "none of the hook points pattern")]:
            out = os.path.join(scratch, "bad.h5")
            failed = run(tool, *args, "--out", out)
            lines = failed.stderr.strip().splitlines()
            assert failed.returncode != 0 and needle in failed.stderr and len(lines) == 1, (args, failed.stderr)
            assert not any(name.startswith("bad.h5") for name in os.listdir(scratch)), os.listdir(scratch)
        # Overlapping patterns dump a hook point once.
        overlap = os.path.join(scratch, "overlap.h5")
        assert run(tool, *common[:4], "--hooks", "layers.*.mlp,layers.0.mlp", "--out", overlap).returncode == 0
        with h5py.File(overlap, "r") as h5:
            assert h5["activations/layers.0.mlp/forward"].shape[0] == 2

        # The summary counts activations and the file apart.
        assert " MB of activations in " in result_single.stdout and ", file " in result_single.stdout, \
            result_single.stdout

        failed = run(*mpirun, "-np", "2", tool, "--input", tokens, "--model", os.path.join(fixtures, "gpt_traced.pt"),
                     "--hooks", "layers.0.mlp", "--out", os.path.join(scratch, "x.h5"), "--tp", "2")
        assert failed.returncode != 0 and "n_heads" in failed.stderr, failed.stderr

        # A world larger than the mesh is no silent double run: dp defaults to the world.
        implicit = os.path.join(scratch, "implicit_dp.h5")
        result = run(*mpirun, "-np", "2", tool, *common, "--out", implicit, "--batch-size", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        with h5py.File(implicit, "r") as h5:
            assert h5.attrs["dp"] == 2
        failed = run(*mpirun, "-np", "2", tool, *common, "--out", os.path.join(scratch, "x.h5"), "--dp", "1")
        assert failed.returncode != 0 and "were started" in failed.stdout + failed.stderr, failed.stderr

        # Errors that rank 0 alone meets end every rank.
        seconds = [ends_every_rank(mpirun, tool, [*common, "--out", os.path.join(scratch, "missing", "x.h5")],
                                   "missing"),
                   ends_every_rank(mpirun, tool, [*common, "--out", os.path.join(scratch, "z.h5"),
                                                  "--compression", "gzip:12"], "gzip:12")]
        print(f"flex-dump: a rank-0 error ends both ranks in {max(seconds):.1f} s")

        # Ranks handed other arguments (a wrapper choosing them by rank) fail naming what differs.
        more = os.path.join(scratch, "more_tokens.npy")
        np.save(more, np.concatenate([np.load(tokens)] * 2))
        def job(**changes):
            options = {"--model": model, "--input": tokens, "--hooks": "layers.*.mlp,embed_tokens",
                       "--out": os.path.join(scratch, "disagree.h5"), "--batch-size": "2", **changes}
            return " ".join(shlex.quote(item) for item in [tool] + [item for pair in options.items() for item in pair])

        for change, needle in [({"--hooks": "layers.0.mlp"}, "disagree on --hooks"),
                               ({"--input": more}, "disagree on the input's shape"),
                               ({"--batch-size": "4"}, "disagree on --batch-size")]:
            rank0, rank1 = job(), job(**change)
            wrapper = f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exec {rank1}; else exec {rank0}; fi'
            ends_every_rank(mpirun, "sh", ["-c", wrapper], needle)
            assert not os.path.exists(os.path.join(scratch, "disagree.h5"))

        # Every row is checked before the file exists: an id out of the vocabulary in the last row.
        vocab = torch.jit.load(model).embed_tokens.weight.shape[0]
        bad = np.load(tokens).copy()
        bad[-1, 2] = vocab + 5
        bad_tokens = os.path.join(scratch, "bad_tokens.npy")
        np.save(bad_tokens, bad)
        for out, extra in [(os.path.join(scratch, "bad.h5"), []), (single, ["--overwrite"])]:
            before = os.path.getmtime(single)
            failed = run(tool, *common[:2], "--input", bad_tokens, *common[4:], "--out", out, "--batch-size", "1",
                         *extra)
            assert failed.returncode != 0 and f"row {len(bad) - 1} holds token id {vocab + 5}" in failed.stderr, \
                failed.stderr
            assert not os.path.exists(os.path.join(scratch, "bad.h5")), "a file was left behind"
            assert os.path.getmtime(single) == before and not os.path.exists(single + ".new"), "the old file changed"

        # SIGTERM (and SIGINT, SIGHUP) stop the dump between forwards: what was written is kept, exit 128 + 15.
        many = os.path.join(scratch, "many_tokens.npy")
        np.save(many, np.concatenate([np.load(tokens)] * 500))
        interrupted = os.path.join(scratch, "interrupted.h5")
        process = subprocess.Popen([tool, *common[:2], "--input", many, *common[4:], "--out", interrupted,
                                    "--batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(interrupted) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 143 and "stopped by signal 15" in stderr, (process.returncode, stderr)
        with h5py.File(interrupted, "r") as h5:
            steps = int(h5.attrs["steps"])
            assert 0 < steps < len(np.load(many)), steps
            for name in h5["rows_per_step"]:
                for hook_type in h5["rows_per_step"][name]:
                    assert h5["rows_per_step"][name][hook_type].shape[0] == steps, (name, hook_type)

        # --overwrite replaces regular files only: a pipe stays a pipe.
        pipe = os.path.join(scratch, "pipe")
        os.mkfifo(pipe)
        failed = run(tool, *common, "--out", pipe, "--overwrite")
        assert failed.returncode != 0 and "is not a regular file" in failed.stderr, failed.stderr
        assert stat.S_ISFIFO(os.stat(pipe).st_mode)

        # An existing file is kept unless --overwrite; --append continues it.
        kept = run(tool, *common, "--out", single)
        assert kept.returncode != 0 and single in kept.stderr and "pass --overwrite" in kept.stderr, kept.stderr
        assert run(tool, *common, "--out", single, "--overwrite").returncode == 0
        assert run(tool, *common, "--out", single, "--append").returncode == 0
        with h5py.File(single, "r") as h5:
            assert h5["activations/layers.0.mlp/forward"].shape[0] == 4
            # The appended steps' token ids follow the file's.
            np.testing.assert_array_equal(h5["tokens"][()], np.concatenate([np.load(tokens)] * 2))
            assert list(h5["tokens_rows_per_step"][()]) == list(h5["rows_per_step/layers.0.mlp/forward"][()])
        # --append continues only the file's own hook points; otherwise the file stays byte for byte.
        with open(single, "rb") as f:
            before = f.read()
        other = run(tool, "--model", model, "--input", tokens, "--hooks", "norm", "--out", single, "--append")
        assert other.returncode != 0 and "append with the hook points that wrote the file" in other.stderr, \
            other.stderr
        with open(single, "rb") as f:
            assert f.read() == before, "a refused --append changed the file"

        # A file-size limit (ulimit -f) is a full disk: a message, exit 1, no file and no .partial left.
        limited = os.path.join(scratch, "limited.h5")
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))
        failed = subprocess.run([tool, *common[:2], "--input", many, "--hooks", "**", "--out", limited,
                                 "--batch-size", "1"], capture_output=True, text=True, preexec_fn=limit)
        assert failed.returncode == 1 and "file-size limit, ulimit -f" in failed.stderr, (failed.returncode, failed.stderr)
        assert not os.path.exists(limited) and not os.path.exists(limited + ".partial"), os.listdir(scratch)

        # An --append that fails late, at a limit some hundred steps on, leaves the file byte for byte.
        continued = os.path.join(scratch, "continued.h5")
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))
        assert run(tool, *common, "--out", continued).returncode == 0
        with open(continued, "rb") as f:
            before = f.read()
        failed = subprocess.run([tool, *common[:2], "--input", many, *common[4:], "--out", continued, "--append",
                                 "--batch-size", "1"], capture_output=True, text=True, preexec_fn=limit)
        assert failed.returncode == 1 and "could not write to" in failed.stderr and \
            "file-size limit, ulimit -f" in failed.stderr, (failed.returncode, failed.stderr)
        with open(continued, "rb") as f:
            assert f.read() == before, "a failed --append changed the file"
        assert not [name for name in os.listdir(scratch) if name.startswith("continued.h5.")], os.listdir(scratch)
        # The copy a killed --append left holds its steps: a later --append refuses to overwrite it.
        shutil.copy(continued, continued + ".appending")
        refused = run(tool, *common, "--out", continued, "--append")
        assert refused.returncode != 0 and "continued.h5.appending' exists" in refused.stderr, refused.stderr
        with open(continued, "rb") as f:
            assert f.read() == before
    print(f"flex-dump: {checked} datasets equal PyTorch's hooks; meshes (1,1,2) (2,1,2) (1,3,1) equal one process; "
          "errors leave no file")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
