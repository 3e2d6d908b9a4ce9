"""The study's picture: every head's induction score, and the top head's
attention pattern averaged over the evaluation batch.

    plot.py OUT_DIR PICTURE.png
"""
import json
import os
import sys

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out_dir, picture):
    with open(os.path.join(out_dir, "scores.json")) as handle:
        scores = json.load(handle)
    top = scores["top"]
    with h5py.File(os.path.join(out_dir, "patterns.h5"), "r") as h5:
        pattern = h5[f"activations/layers.{top['layer'] - 1}::pattern/forward"][:, top["head"]].mean(0)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    induction = scores["induction"]
    image = left.imshow(induction, cmap="viridis", vmin=0, vmax=1)
    left.set_xticks(range(len(induction[0])))
    left.set_yticks(range(len(induction)), [f"layer {i + 1}" for i in range(len(induction))])
    left.set_xlabel("head")
    left.set_title("induction score")
    for layer, row in enumerate(induction):
        for head, value in enumerate(row):
            left.text(head, layer, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.5 else "k")
    figure.colorbar(image, ax=left, fraction=0.046)
    right.imshow(pattern, cmap="magma", vmin=0, vmax=1)
    right.set_title(f"layer {top['layer']} head {top['head']}: mean pattern\n(the stripe: the token after the previous "
                    "occurrence)")
    right.set_xlabel("key position")
    right.set_ylabel("query position")
    figure.tight_layout()
    figure.savefig(picture, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
