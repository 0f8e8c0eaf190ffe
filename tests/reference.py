"""Independent numpy references of the merge formulas in docs/methods.md (no torch, no package code)."""

import numpy as np


def naive_mc(sources, weights=None):
    w = np.ones(len(sources)) if weights is None else np.asarray(weights, dtype=np.float64)
    return sum(wi * s for wi, s in zip(w, sources)) / w.sum()


def _trim(tau, density):
    if density >= 1:
        return tau
    k = int(density * tau.size)
    order = np.sort(np.abs(tau).ravel())[::-1]
    thr = order[k - 1]
    return np.where(np.abs(tau) >= thr, tau, 0.0)


def mmer(base, sources, election="max", density=1.0, alpha=1.0, lam=1.0, mask="l1", rescale=False):
    """Return (merged, tau_star, masks, scales), element by element as the docs define them."""
    taus = [s - base for s in sources]
    if election == "ties":
        taus_e = [_trim(t, density) for t in taus]
    else:
        taus_e = taus
    total = sum(taus_e)
    gamma = np.sign(total)
    tau_star = np.zeros_like(base)
    it = np.nditer(base, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        vals = [t[idx] for t in taus_e if t[idx] != 0 and np.sign(t[idx]) == gamma[idx]]
        if not vals:
            continue
        if election == "max":
            tau_star[idx] = gamma[idx] * max(abs(v) for v in vals)
        else:
            tau_star[idx] = sum(vals) / len(vals)
    if mask == "sign":
        masks = [t * tau_star > 0 for t in taus]
    else:
        masks = [np.abs(t) >= lam * np.abs(tau_star - t) for t in taus]
    scales = []
    for t, m in zip(taus, masks):
        den = np.abs(tau_star * m).sum()
        scales.append(np.abs(t).sum() / den if (rescale and den > 0) else 1.0)
    return base + alpha * tau_star, tau_star, masks, scales


def composite_vocabulary(named, base_rows, added, pad_to=None):
    """Where the composite's vocabulary puts the tokens sources add, from two facts only: a tokenizer
    gives a token added to it the next id after the `named` ids it holds (named, named + 1, ...),
    and the composite's embedding keeps the base's `base_rows` rows (a padded embedding: more rows
    than its tokenizer names). Returns (the added tokens' ids, the base rows the method merges: every
    base row no added token takes, the composite's row count, padded to a multiple of `pad_to`)."""
    ids = [named + k for k in range(added)]
    merged = np.array([r for r in range(base_rows) if r not in ids], dtype=np.int64)
    rows = max([base_rows] + [i + 1 for i in ids])
    if pad_to:
        rows = -(-rows // pad_to) * pad_to
    return ids, merged, rows
