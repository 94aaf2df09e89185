"""End to end on real data: scikit-learn's digits, 0-4 in distribution, 5-9 out of distribution.

Stand-ins for the CLIP encoders (no weights can be downloaded here):
  * image embeddings: L2-normalised 24-d PCA of the pixels (PCA fitted on the ID training half);
  * "text" embeddings: normalised class means of the ID training embeddings;
  * dense patch embeddings (GL-MCM): the image with all but one 4x4 quadrant replaced by the mean
    image, embedded the same way (4 "patches");
  * NegLabel/AdaNeg word list: 2000 synthetic stroke images (1-3 random line segments), mined
    with the percentile rule (15% kept), so no OOD digit is used to build the negatives;
  * CLIPN "no" classifier: for class k, the normalised mean of the other ID prototypes.
Logit scale 10 instead of CLIP's 100: PCA cosines spread over [-1, 1], not CLIP's ~[0.1, 0.35],
and 100 saturates float32 softmaxes (MSP ties at 1.0).

Measured on this split (AUROC / FPR95 OpenOOD / FPR95 nearest): max-logit 0.930/0.189/0.496,
energy 0.932/0.191/0.482, MCM 0.922/0.197/0.571, GL-MCM 0.915/0.251/0.594, MSP 0.901/0.215/0.665,
CLIPN-CTW 0.922/0.222/0.534, CLIPN-ATD 0.909/0.302/0.587, AdaNeg 0.883/0.328/0.679, NegLabel
0.874/0.386/0.679 (run with `-s` to print them). The assertions check that each score clearly
beats chance on real data and that the metrics agree with scikit-learn on these very scores.
"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import clipjax.ood as ood

SCALE = 10.0


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    from skimage.draw import line
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.images.astype(np.float32) / 16.0, data.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)
    pca = PCA(24, random_state=0).fit(x_tr[y_tr < 5].reshape(-1, 64))

    def embed(images):
        return _unit(pca.transform(images.reshape(len(images), 64))).astype(np.float32)

    def embed_local(images):
        patches = []
        for r, c in ((0, 0), (0, 4), (4, 0), (4, 4)):
            masked = np.broadcast_to(pca.mean_.reshape(8, 8), images.shape).copy()
            masked[:, r:r + 4, c:c + 4] = images[:, r:r + 4, c:c + 4]
            patches.append(embed(masked))
        return np.stack(patches, 1)  # [B, 4, D]

    train = embed(x_tr[y_tr < 5])
    text = _unit(np.stack([train[y_tr[y_tr < 5] == c].mean(0) for c in range(5)])).astype(np.float32)
    rng = np.random.default_rng(0)
    strokes = np.zeros((2000, 8, 8), np.float32)
    for img in strokes:
        for _ in range(rng.integers(1, 4)):
            rr, cc = line(*rng.integers(0, 8, 4))
            img[rr, cc] = 1.0
    candidates = embed(strokes)
    negatives = ood.mine_negative_labels(candidates, None, text).select(candidates)
    id_x, ood_x = x_te[y_te < 5], x_te[y_te >= 5]
    return dict(text=text, negatives=np.asarray(negatives), id=embed(id_x), ood=embed(ood_x),
                id_local=embed_local(id_x), ood_local=embed_local(ood_x), rng=rng)


def test_digits_every_score(digits):
    text, neg = digits["text"], digits["negatives"]
    assert neg.shape == (300, 24)  # 15% of 2000 candidates
    no = _unit(np.stack([np.delete(text, c, 0).mean(0) for c in range(5)])).astype(np.float32)
    scores = {
        "max_logit": lambda e, loc: ood.max_logit(e @ text.T),
        "energy": lambda e, loc: ood.energy(SCALE * e @ text.T),
        "msp": lambda e, loc: ood.msp(SCALE * e @ text.T),
        "mcm": lambda e, loc: ood.mcm(e, text),
        "gl_mcm": lambda e, loc: ood.gl_mcm(e, loc, text),
        "neglabel": lambda e, loc: ood.neglabel_score(e, text, neg, num_groups=6, logit_scale=SCALE),
        "clipn_atd": lambda e, loc: ood.clipn_scores(e, text, no, logit_scale=SCALE).atd,
        "clipn_ctw": lambda e, loc: ood.clipn_scores(e, text, no, logit_scale=SCALE).ctw,
    }
    results = {}
    for name, fn in scores.items():
        s_in = np.asarray(fn(digits["id"], digits["id_local"]))
        s_out = np.asarray(fn(digits["ood"], digits["ood_local"]))
        results[name] = (s_in, s_out)
    # AdaNeg is online: one shuffled stream of ID and OOD test images
    stream = np.concatenate([digits["id"], digits["ood"]])
    order = digits["rng"].permutation(len(stream))
    ada = np.empty(len(stream), np.float32)
    ada[order] = np.asarray(ood.adaneg_scores(stream[order], text, neg, batch_size=64, logit_scale=SCALE).score)
    results["adaneg"] = (ada[: len(digits["id"])], ada[len(digits["id"]):])

    for name, (s_in, s_out) in results.items():
        m = ood.ood_metrics(s_in, s_out)
        fpr_nearest = float(ood.fpr_at_tpr(s_in, s_out, 0.95, "nearest"))
        print(f"{name:10s} AUROC {m['auroc']:.4f}  FPR95 openood {m['fpr']:.4f}  nearest {fpr_nearest:.4f}")
        want = roc_auc_score(np.r_[np.ones(s_in.size), np.zeros(s_out.size)], np.r_[s_in, s_out].astype(np.float64))
        assert m["auroc"] == pytest.approx(want, abs=1e-6)
        assert m["auroc"] > 0.85, name  # measured 0.87-0.93; chance is 0.5
        assert m["fpr"] < 0.5, name  # measured 0.19-0.38; a useless score gives ~0.95
