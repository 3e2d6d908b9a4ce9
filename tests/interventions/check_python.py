"""Python's torch reads interventions flexmodel saved: their parameters, kind and configuration, and
recomputes their edit of a saved input.

    check_python.py STEERING.pt LOW_RANK.pt SAMPLES.pt
SAMPLES.pt holds x, and steered and low_ranked: what flexmodel's interventions made of x.
"""
import json
import sys

import torch


def main(steering_path, low_rank_path, samples_path):
    samples = torch.jit.load(samples_path)
    x = samples.x
    steering = torch.jit.load(steering_path)
    assert steering.flexmodel_kind == "steering_vector", steering.flexmodel_kind
    config = json.loads(steering.flexmodel_config)
    assert config["d_model"] == x.shape[-1], config
    torch.testing.assert_close(x + config["coefficient"] * steering.direction, samples.steered, rtol=0, atol=1e-6)
    low_rank = torch.jit.load(low_rank_path)
    assert low_rank.flexmodel_kind == "low_rank", low_rank.flexmodel_kind
    config = json.loads(low_rank.flexmodel_config)
    assert tuple(low_rank.down.shape) == (config["d_model"], config["rank"]), (low_rank.down.shape, config)
    torch.testing.assert_close(x + x @ low_rank.down @ low_rank.up, samples.low_ranked, rtol=1e-5, atol=1e-5)
    print("python read both interventions and recomputed their edits")


if __name__ == "__main__":
    main(*sys.argv[1:])
