"""Self-attention over date questions with the seed notebook's five layers.

Takes the first 10 questions of the date task, computes the attention weights
``score = softmax(Q K^T / sqrt(d))`` and the output ``Z = score @ value``, backpropagates
``dZ = 1`` through both layers, and prints the shapes:

    python examples/seed_demo.py [--backend numba] [--D 512] [--d 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import fastattn
from dataset import sequence
from fastattn import CompatibilityFunction, WeightedValue
from fastattn.kernels import BACKENDS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="kernel backend (default: the current one, numba unless set)")
    parser.add_argument("--D", type=int, default=512, help="embedding size of the key layer")
    parser.add_argument("--d", type=int, default=64, help="key/query/value size")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)

    (x_train, _), _ = sequence.load_data("date.txt")
    char_to_id, _ = sequence.get_vocab()
    V = len(char_to_id)
    xs = x_train[:10]  # (10, 29)

    start = time.perf_counter()
    comp_func = CompatibilityFunction(V, args.D, args.d, backend=args.backend, seed=args.seed)
    weight_func = WeightedValue(V, args.d, backend=args.backend, seed=args.seed + 1)

    score = comp_func.forward(xs)  # (10, 29, 29)
    Z = weight_func.forward(xs, score)  # (10, 29, d)

    dZ = np.ones_like(Z)
    dscore, dvalue = weight_func.backward(dZ)  # (10, 29, 29), (10, 29, d)
    comp_func.backward(dscore)
    elapsed = time.perf_counter() - start

    print("score shape:", score.shape)
    print("dscore shape:", dscore.shape)
    print()
    print("value shape:", xs.shape)
    print("dvalue shape:", dvalue.shape)
    print()
    print("Z shape:", Z.shape)
    print("dZ shape:", dZ.shape)
    print()
    print(f"rows of score sum to 1: {bool(np.allclose(score.sum(axis=-1), 1.0, atol=1e-5))}")
    print(f"params: {len(comp_func.params)} in the compatibility function, "
          f"{len(weight_func.params)} in the weighted value")
    backend = args.backend or fastattn.get_backend()
    print(f"backend {backend}: {elapsed * 1e3:.1f} ms (including any JIT compile)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
