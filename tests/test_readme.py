"""The README's code examples run and say what they claim."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def _block(marker: str) -> str:
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README block containing {marker!r}"
    return found[0]


def test_readme_attention_functions_example_runs_and_matches_the_reference():
    ns = {}
    exec(_block("fastattn.softmax("), ns)  # noqa: S102 - our own README
    q, k, v, out, lse = (ns[n] for n in ("q", "k", "v", "out", "lse"))
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == q.shape[:-1]
    assert ns["dq"].shape == q.shape and ns["dk"].shape == k.shape and ns["dv"].shape == v.shape
    # the causal output, recomputed densely in float64
    s = np.einsum("...id,...jd->...ij", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    T = s.shape[-1]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, p @ v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["y"].sum(-1), 1.0, rtol=1e-12)


def test_readme_layers_example_runs_with_the_shapes_it_states():
    ns = {}
    exec(_block("CompatibilityFunction(V, D, d"), ns)  # noqa: S102 - our own README
    assert ns["score"].shape == (10, 29, 29)
    assert ns["Z"].shape == (10, 29, 64)
    assert ns["dscore"].shape == (10, 29, 29) and ns["dvalue"].shape == (10, 29, 64)
    assert any(np.abs(g).sum() > 0 for g in ns["comp"].grads)


@pytest.mark.parametrize("command", ["train", "translate", "bench", "profile", "info"])
def test_readme_names_every_command(command):
    with open(README, encoding="utf-8") as f:
        assert f"fastattn {command}" in f.read()


def test_readme_attention_features_example_runs_and_merges_to_the_full_attention():
    import fastattn

    ns = {"np": np, "fastattn": fastattn}
    exec(_block("fastattn.merge_attention("), ns)  # noqa: S102 - our own README
    full = fastattn.attention_forward(ns["q"], ns["k"], ns["v"])
    np.testing.assert_allclose(ns["out2"], full[0], rtol=1e-4, atol=1e-5)
    assert ns["dbias"].shape == ns["bias"].shape and ns["dk"].shape == ns["k"].shape
