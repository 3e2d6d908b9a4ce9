"""The trained attention-only model as TorchScript: the same layers in PyTorch,
the weights the C++ run saved, torch.jit.script.

    export.py WEIGHTS.pt OUT.pt HEADS
"""
import os
import sys

import torch
from torch import nn

# models::Attention of flexmodel is the fixtures' Attention: fused q | k | v,
# causal softmax, output projection; it returns (output, pattern).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures"))
from make_fixtures import Attention  # noqa: E402


class AttnOnly(nn.Module):
    def __init__(self, vocab: int, time: int, width: int, heads: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.embed_positions = nn.Embedding(time, width)
        self.layers = nn.ModuleList([Attention(width, heads) for _ in range(layers)])
        self.unembed = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens) + self.embed_positions(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            h = h + layer(h)[0]
        return self.unembed(h)


def main(weights_path, out_path):
    weights = dict(torch.jit.load(weights_path).named_parameters())
    vocab, width = weights["embed_tokens.weight"].shape
    time = weights["embed_positions.weight"].shape[0]
    layers = len({name.split(".")[1] for name in weights if name.startswith("layers.")})
    heads = int(sys.argv[3])
    model = AttnOnly(vocab, time, width, heads, layers)
    model.load_state_dict(weights, strict=True)
    torch.jit.script(model.eval()).save(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
