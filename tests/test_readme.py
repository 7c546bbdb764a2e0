"""The README's code examples run and say what they claim."""

import os
import re

import numpy as np
import pytest
from helpers import assert_close, attention_bounds

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
    bounds = attention_bounds(q, k, v, p, scale=1 / np.sqrt(q.shape[-1]))
    assert_close(out, p @ v, terms=bounds["out"][0], n=bounds["out"][1])
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


def test_readme_rnnlm_example_learns_the_toy_corpus():
    import fastattn

    ns = {}
    exec(_block("class Rnnlm"), ns)  # noqa: S102 - our own README
    assert isinstance(ns["model"].lstm_layer, fastattn.TimeLSTM)
    perplexity = ns["perplexity"]
    assert len(perplexity) == 20 and np.isfinite(perplexity).all()
    # 7 words, and each follows from the two before: a model that learned it is near 1
    assert perplexity[0] > 4 and perplexity[-1] < 1.5


def test_readme_seq2seq_example_trains_and_generates():
    import fastattn
    from dataset import sequence

    ns = {}
    exec(_block("class Seq2seq:"), ns)  # noqa: S102 - our own README
    (x, t), _ = sequence.load_data("addition.txt")
    char_to_id, id_to_char = sequence.get_vocab()
    x, t = x[:640, ::-1], t[:640]
    model = ns["Seq2seq"](len(char_to_id), 16, 64)
    assert isinstance(model.encoder.lstm, fastattn.TimeLSTM)
    trainer = fastattn.Trainer(model, fastattn.Adam())
    trainer.fit(x, t, max_epoch=4, batch_size=32, max_grad=5.0, eval_interval=20)
    losses = trainer.loss_list  # one mean loss per epoch
    assert losses[-1] < losses[0] - 0.2  # it learns (from 2.56 to about 2.17 in 80 steps)
    ids = model.generate(x[:1], int(t[0, 0]), t.shape[1] - 1)
    assert len(ids) == t.shape[1] - 1 and all(0 <= i < len(char_to_id) for i in ids)
    assert fastattn.eval_seq2seq(model, x[[0]], t[[0]], id_to_char, verbose=False,
                                 is_reverse=True) in (0, 1)
