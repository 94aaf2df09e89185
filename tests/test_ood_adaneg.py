"""AdaNeg memory updates and scores, batch by batch, against a float64 numpy transcription of
`YBZh/OpenOOD-VLM:openood/postprocessors/ttaprompt_postprocessor.py:TTAPromptPostprocessor_noadagap.postprocess`.

The oracle keeps the reference's layout (memleng + 1 slots per label, `indice_memory` starting
at 1, the ID write loop then the OOD write loop, sort-based max-entropy replacement, mean or
attention-weighted proxies, grouped softmax scores). The data is built so that every kind of
write happens: ID writes, negative writes, full slots that replace their highest-entropy entry
and full slots that refuse a higher-entropy image.

Tolerances: memory contents and entropies atol 1e-5 (float32 copies of unit vectors and
float32 entropies of softmax(100 cos)); counts exact; scores rtol 1e-4 (float32 grouped
softmax and, for the sample-adaptive proxies, the Gram-matrix norm vs the direct float64 norm).
"""

import jax
import numpy as np
import pytest

from clipjax.ood import adaneg_scores, adaneg_update, init_memory
from clipjax.ood.adaneg import AdaNegState


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _grouped(pos, neg, group_num, perm):
    drop = neg.shape[1] % group_num
    if drop > 0:
        neg = neg[:, :-drop]
    neg = neg[:, perm].reshape(pos.shape[0], group_num, -1)
    scores = [_softmax(np.concatenate([pos, neg[:, i]], -1))[:, : pos.shape[1]].sum(-1) for i in range(group_num)]
    return np.stack(scores, -1).mean(-1)


class Oracle:
    """The reference postprocessor's state and `postprocess`, in float64 numpy."""

    def __init__(self, id_t, neg_t, memleng, thres, gap, lam, group_num, perm, samada, beta, scale=100.0):
        self.text = _unit(np.concatenate([id_t, neg_t]).astype(np.float64))
        self.k = len(id_t)
        self.memory_size, self.thres, self.gap, self.lam = memleng, thres, gap, lam
        self.group_num, self.perm, self.samada, self.beta, self.scale = group_num, perm, samada, int(beta), scale
        c, d = self.text.shape
        self.feat_memory = np.concatenate([self.text[:, None], np.zeros((c, memleng, d))], 1)
        self.indice_memory = np.ones(c)
        self.entropy_memory = np.zeros((c, memleng + 1))
        self.events = {"append": 0, "replace": 0, "refuse": 0}

    def _write(self, cate, prob, feature):
        # The entropy is taken in float32 as the reference's torch tensors are: in float64,
        # -(p * log(p + 1e-8)) of a near one-hot p is slightly *negative* (log(1 + 1e-8) > 0),
        # which would let a new image replace the text entry (entropy 0); in float32 it is >= 0.
        p32 = prob.astype(np.float32)
        ent = float(-(p32 * np.log(p32 + np.float32(1e-8))).sum(dtype=np.float32))
        if self.indice_memory[cate] == self.memory_size:
            if (ent < self.entropy_memory[cate]).sum() == 0:
                self.events["refuse"] += 1
                return
            self.events["replace"] += 1
            j = np.argmax(self.entropy_memory[cate])  # sort()[-1]; first max on (measure-zero) ties
            self.feat_memory[cate][j] = feature
            self.entropy_memory[cate][j] = ent
        else:
            self.events["append"] += 1
            j = int(self.indice_memory[cate])
            self.feat_memory[cate][j] = feature
            self.entropy_memory[cate][j] = ent
            self.indice_memory[cate] += 1

    def postprocess(self, x):
        x = _unit(x.astype(np.float64))
        k = self.k
        out_v = self.scale * x @ self.text.T
        conf_v = _grouped(out_v[:, :k], out_v[:, k:], self.group_num, self.perm)
        act = conf_v > self.thres + self.gap * (1 - self.thres)
        pred, prob = out_v[:, :k].argmax(1), _softmax(out_v[:, :k])
        for i in np.flatnonzero(act):
            self._write(pred[i], prob[i], x[i])
        act = conf_v < self.thres - self.gap * self.thres
        pred, prob = out_v[:, k:].argmax(1), _softmax(out_v[:, k:])
        for i in np.flatnonzero(act):
            self._write(pred[i] + k, prob[i], x[i])
        sim = np.exp(-self.beta * (1 - self.feat_memory @ x.T))  # [C, L+1, B]
        if self.samada:
            sa = np.einsum("clb,cld->bcd", sim, self.feat_memory)
            sa /= np.linalg.norm(sa, axis=-1, keepdims=True)
            output = self.scale * np.einsum("bd,bcd->bc", x, sa)
        else:
            sa = self.feat_memory.mean(1)
            sa /= np.linalg.norm(sa, axis=-1, keepdims=True)
            output = self.scale * x @ sa.T
        conf_in = _grouped(output[:, :k], output[:, k:], self.group_num, self.perm)
        prob_all = _softmax(out_v) + _softmax(output) * self.lam
        return conf_in + conf_v * self.lam, conf_v, prob_all[:, :k].argmax(1)


def _stream(seed=0, k=4, m=11, d=16, n=90):
    """Images near ID labels (confident ID), near negative labels (confident OOD) and in between."""
    rng = np.random.default_rng(seed)
    id_t = _unit(rng.normal(size=(k, d)))
    neg_t = _unit(rng.normal(size=(m, d)))
    kind = rng.integers(0, 3, n)
    centre = np.where(kind[:, None] == 0, id_t[rng.integers(0, k, n)],
                      np.where(kind[:, None] == 1, neg_t[rng.integers(0, m, n)], rng.normal(size=(n, d)) * 0.3))
    x = centre + rng.normal(size=(n, d)) * rng.uniform(0.05, 0.4, (n, 1))
    return id_t.astype(np.float32), neg_t.astype(np.float32), x.astype(np.float32)


CONFIG = dict(memory_length=3, num_groups=2, threshold=0.5, gap=0.5, lambda_=0.1, beta=5.0)


def _check_state(state: AdaNegState, oracle: Oracle, length):
    np.testing.assert_array_equal(np.asarray(state.count), oracle.indice_memory.astype(np.int32))
    np.testing.assert_allclose(state.memory, oracle.feat_memory[:, :length], rtol=0, atol=1e-5)
    np.testing.assert_allclose(state.entropy, oracle.entropy_memory[:, :length], rtol=0, atol=1e-5)
    assert not oracle.feat_memory[:, length:].any()  # the reference never fills its last slot
    memory = np.asarray(state.memory, np.float64)
    np.testing.assert_allclose(state.slot_sum, memory.sum(1), atol=1e-5)
    np.testing.assert_allclose(state.gram, np.einsum("cld,cmd->clm", memory, memory), atol=1e-5)


@pytest.mark.parametrize("sample_adaptive", [False, True])
def test_memory_and_scores_step_by_step(sample_adaptive):
    id_t, neg_t, x = _stream()
    k, m = len(id_t), len(neg_t)
    perm = np.random.default_rng(1).permutation(m - m % CONFIG["num_groups"])
    oracle = Oracle(id_t, neg_t, CONFIG["memory_length"], CONFIG["threshold"], CONFIG["gap"], CONFIG["lambda_"],
                    CONFIG["num_groups"], perm, sample_adaptive, CONFIG["beta"])
    state = init_memory(id_t, neg_t, CONFIG["memory_length"])
    step = jax.jit(lambda s, xb, v: adaneg_update(
        s, xb, v, num_id=k, permutation=perm, num_groups=CONFIG["num_groups"], threshold=CONFIG["threshold"],
        gap=CONFIG["gap"], lambda_=CONFIG["lambda_"], sample_adaptive=sample_adaptive, beta=CONFIG["beta"]))
    bs = 15
    scores = []
    for start in range(0, len(x), bs):
        xb = x[start:start + bs]
        state, out = step(state, xb, np.ones(len(xb), bool))
        want_score, want_vanilla, want_pred = oracle.postprocess(xb)
        _check_state(state, oracle, CONFIG["memory_length"])
        np.testing.assert_allclose(out.vanilla, want_vanilla, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out.score, want_score, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(out.prediction, want_pred)
        scores.append(want_score)
    counts = oracle.indice_memory
    # the stream exercised ID writes, negative writes and full slots
    assert (counts[:k] > 1).any() and (counts[k:] > 1).any() and (counts == CONFIG["memory_length"]).sum() >= 3
    assert min(oracle.events.values()) > 0, oracle.events  # appends, replacements and refusals all happened

    # the scan over the whole stream (last batch padded: 90 = 6 * 15, so use 13-image batches) equals
    # the reference run with the same batch size
    oracle2 = Oracle(id_t, neg_t, CONFIG["memory_length"], CONFIG["threshold"], CONFIG["gap"], CONFIG["lambda_"],
                     CONFIG["num_groups"], perm, sample_adaptive, CONFIG["beta"])
    want = np.concatenate([oracle2.postprocess(x[s:s + 13])[0] for s in range(0, len(x), 13)])
    out, final = adaneg_scores(x, id_t, neg_t, batch_size=13, permutation=perm, sample_adaptive=sample_adaptive,
                               return_state=True, **CONFIG)
    np.testing.assert_allclose(out.score, want, rtol=1e-4, atol=1e-6)
    _check_state(final, oracle2, CONFIG["memory_length"])


def test_order_dependence_and_continuation():
    id_t, neg_t, x = _stream(seed=3)
    a = adaneg_scores(x, id_t, neg_t, batch_size=10, **CONFIG).score
    rev = adaneg_scores(x[::-1], id_t, neg_t, batch_size=10, **CONFIG).score[::-1]
    assert not np.allclose(a, rev)  # online: the order of the stream matters
    # continuing from a returned state equals one long stream
    first, state = adaneg_scores(x[:40], id_t, neg_t, batch_size=10, return_state=True, **CONFIG)
    second = adaneg_scores(x[40:], id_t, neg_t, batch_size=10, state=state, **CONFIG)
    np.testing.assert_allclose(np.concatenate([first.score, second.score]), a, rtol=1e-6)


def test_adaneg_bad_input():
    id_t, neg_t, x = _stream()
    with pytest.raises(ValueError, match="num_groups"):
        adaneg_scores(x, id_t, neg_t, num_groups=50)
    with pytest.raises(ValueError, match="dimensions differ"):
        adaneg_scores(x[:, :8], id_t, neg_t)
    with pytest.raises(ValueError, match="empty"):
        adaneg_scores(x, id_t[:0], neg_t)
    bad = x.copy()
    bad[7, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        adaneg_scores(bad, id_t, neg_t)
    with pytest.raises(ValueError, match="memory_length"):
        adaneg_scores(x, id_t, neg_t, memory_length=0)
    state = init_memory(id_t, neg_t[:5], 3)
    with pytest.raises(ValueError, match="slots"):
        adaneg_scores(x, id_t, neg_t, state=state)
