"""The fixture GPT's logits with one head's attention pattern zeroed in every
layer, computed by the eager model of tests/fixtures/make_fixtures.py with
torch.softmax wrapped: PyTorch's own version of a value-hook edit.

    zeroed_head_logits.py FIXTURE_DIR HEAD OUT.npy
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import make_fixtures  # noqa: E402


def main(fixtures, head, out):
    model = make_fixtures.GPT()
    model.load_state_dict(torch.jit.load(os.path.join(fixtures, "gpt_scripted.pt")).state_dict())
    model.eval()
    tokens = torch.jit.load(os.path.join(fixtures, "reference.pt")).tensors["tokens"]
    softmax = torch.softmax

    def zeroing(x, dim, *args, **kwargs):
        pattern = softmax(x, dim, *args, **kwargs)
        if pattern.dim() == 4:  # [batch, heads, T, T]: the attention's
            pattern = pattern.clone()
            pattern[:, head] = 0
        return pattern

    torch.softmax = zeroing
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        torch.softmax = softmax
    np.save(out, logits.numpy())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
