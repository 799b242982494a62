"""An independent NumPy implementation of PAPER.md, for the tests.

Written from the definitions (not the package's algorithms): the k-th
largest excluding i is found by deleting i, not by the (k+1)-th trick; the
MoE output is computed by running every expert densely.
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def phi(x):
    return 0.5 * (1.0 + _erf(np.asarray(x, np.float64) / math.sqrt(2.0)))


def softplus(x):
    return np.logaddexp(0.0, x)


def cv_squared(x, eps=1e-10):
    x = np.asarray(x, np.float64)
    return x.var(axis=-1) / (x.mean(axis=-1) ** 2 + eps)


def kth_largest(v, k):
    return np.sort(v)[::-1][k - 1]


def prob_in_top_k(clean, noisy, stddev, k):
    clean, noisy, stddev = (np.asarray(a, np.float64) for a in (clean, noisy, stddev))
    out = np.zeros_like(clean)
    for index in np.ndindex(clean.shape[:-1]):
        n = clean.shape[-1]
        for i in range(n):
            others = np.delete(noisy[index], i)
            if k > len(others):
                out[index + (i,)] = 1.0
                continue
            threshold = kth_largest(others, k)
            out[index + (i,)] = phi(
                (clean[index + (i,)] - threshold) / stddev[index + (i,)]
            )
    return out


def gates(logits, k):
    """Dense G(x) = Softmax(KeepTopK(logits, k)), zeros elsewhere. [..., n]"""
    logits = np.asarray(logits, np.float64)
    out = np.zeros_like(logits)
    for index in np.ndindex(logits.shape[:-1]):
        row = logits[index]
        chosen = np.argsort(-row, kind="stable")[:k]
        e = np.exp(row[chosen] - row[chosen].max())
        out[index + (slice(None),)][chosen] = e / e.sum()
    return out


def noisy_gating(x, w_gate, w_noise, k, noise=None, eps=1e-2):
    """Returns (G [N, n], load [n], importance [n]) for x [N, d].

    With noise None: clean gating, load = counts per expert.
    """
    clean = x @ w_gate
    if noise is None:
        g = gates(clean, k)
        return g, (g > 0).sum(0).astype(np.float64), g.sum(0)
    stddev = softplus(x @ w_noise) + eps
    noisy = clean + noise * stddev
    g = gates(noisy, k)
    load = prob_in_top_k(clean, noisy, stddev, k).sum(0)
    return g, load, g.sum(0)


def balancing_loss(importance, load, w_importance=0.1, w_load=0.1):
    return w_importance * cv_squared(importance) + w_load * cv_squared(load)


def hierarchical_gating(x, w_gate, w_noise, w_group_gate, w_group_noise,
                        num_groups, group_size, k, noise=None, group_noise=None,
                        eps=1e-2):
    """Appendix B from its definitions.

    x [N, d]; w_gate/w_noise [d, a]; w_group_* [d, a*b]; noise [N, a];
    group_noise [N, a, b] (the draw used for each group's gate; only the
    chosen groups' entries matter).
    Returns (G [N, a*b], importance_h [a*b], load_h [a*b]).
    """
    n_tokens = x.shape[0]
    a, b = num_groups, group_size
    clean_p = x @ w_gate
    clean_g = (x @ w_group_gate).reshape(n_tokens, a, b)
    if noise is not None:
        std_p = softplus(x @ w_noise) + eps
        std_g = (softplus(x @ w_group_noise) + eps).reshape(n_tokens, a, b)
        noisy_p = clean_p + noise * std_p
        noisy_g = clean_g + group_noise * std_g
    else:
        noisy_p, noisy_g = clean_p, clean_g
    g_p = gates(noisy_p, k)  # [N, a]
    g_in = gates(noisy_g, k)  # [N, a, b]
    g = (g_p[:, :, None] * g_in).reshape(n_tokens, a * b)
    importance = g.sum(0)
    routed = g_p > 0  # X^(i)
    if noise is not None:
        load_p = prob_in_top_k(clean_p, noisy_p, std_p, k).sum(0)
        p_in = prob_in_top_k(clean_g, noisy_g, std_g, k)  # [N, a, b]
    else:
        load_p = routed.sum(0).astype(np.float64)
        p_in = (g_in > 0).astype(np.float64)
    load_h = np.zeros((a, b))
    for i in range(a):
        members = routed[:, i]
        if members.sum() == 0:
            continue
        load_i = p_in[members, i, :].sum(0)
        load_h[i] = load_p[i] * load_i / members.sum()
    return g, importance, load_h.reshape(-1)


def experts_dense(x, hidden_kernel, hidden_bias, output_kernel, output_bias):
    """Every expert on every row: [E, N, d_out] (ReLU experts)."""
    hidden = np.maximum(np.einsum("nd,edh->enh", x, hidden_kernel) + hidden_bias[:, None], 0)
    return np.einsum("enh,eho->eno", hidden, output_kernel) + output_bias[:, None]


def moe_output(x, dense_gates, hidden_kernel, hidden_bias, output_kernel, output_bias):
    """y = sum_i G(x)_i E_i(x). x [N, d], dense_gates [N, E]."""
    outputs = experts_dense(x, hidden_kernel, hidden_bias, output_kernel, output_bias)
    return np.einsum("ne,eno->no", dense_gates, outputs)


def gated_moe_output(x, dense_gates, gate_kernel, up_kernel, down_kernel):
    """y = sum_i G(x)_i (silu(x Wg_i) * (x Wu_i)) Wd_i, densely (SwiGLU)."""
    x = np.asarray(x, np.float64)
    gate = np.einsum("nd,edh->enh", x, gate_kernel)
    hidden = gate / (1.0 + np.exp(-gate)) * np.einsum("nd,edh->enh", x, up_kernel)
    outputs = np.einsum("enh,eho->eno", hidden, down_kernel)
    return np.einsum("ne,eno->no", dense_gates, outputs)


def softmax_router(logits, k, normalize=True, mask=None, selection_bias=None):
    """The softmax top-k router (issue 14's definition), densely.

    `selection_bias` (loss-free balancing) is added to the probabilities'
    logits only to choose the experts.

    Returns `(gates [N, E], balance_loss, z_loss)`: `balance_loss =
    E * sum_i (c_i / N) * P_i` and `z_loss = mean(logsumexp(logits)^2)`
    over the unmasked positions.
    """
    logits = np.asarray(logits, np.float64)
    n, e = logits.shape
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    shifted = logits - logits.max(-1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    gates = np.zeros_like(p)
    chosen = np.zeros_like(p)
    for t in range(n):
        scores = logits[t] if selection_bias is None else logits[t] + selection_bias
        top = np.argsort(-scores, kind="stable")[:k]
        values = p[t, top] / (p[t, top].sum() if normalize else 1.0)
        if keep[t]:
            gates[t, top] = values
            chosen[t, top] = 1.0
    count = max(keep.sum(), 1)
    c, mean_p = chosen.sum(0), p[keep].sum(0) / count
    balance = e * np.sum(c / count * mean_p)
    lse = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    z = np.sum(lse[keep] ** 2) / count
    return gates, balance, z
