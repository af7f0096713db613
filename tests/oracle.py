"""A direct loop-over-pixels implementation of gspn_scan in numpy float64: the independent oracle.

Written straight from the contract in image coordinates (no canonical frame, no vectorisation),
so it shares no code or indexing trick with the library.
"""
import numpy as np

# Previous-line neighbour k of (i, j), and whether the scan moves along rows.
NEIGHBOUR = {
    "tb": lambda i, j, k: (i - 1, j + k - 1),
    "bt": lambda i, j, k: (i + 1, j + k - 1),
    "lr": lambda i, j, k: (i + k - 1, j - 1),
    "rl": lambda i, j, k: (i + k - 1, j + 1),
}


def _order(name, H, W):
    """(t, i, j) in scan order."""
    if name in ("tb", "bt"):
        rows = range(H) if name == "tb" else range(H - 1, -1, -1)
        return [(t, i, j) for t, i in enumerate(rows) for j in range(W)]
    cols = range(W) if name == "lr" else range(W - 1, -1, -1)
    return [(t, i, j) for t, j in enumerate(cols) for i in range(H)]


def gspn_scan_numpy(x, lam, w, directions=("tb", "bt", "lr", "rl"), chunk=None, normalize=True):
    x, lam, w = (np.asarray(a, np.float64) for a in (x, lam, w))
    B, H, W, C = x.shape
    G = w.shape[4]
    per = C // G
    out = np.zeros(lam.shape)
    for d, name in enumerate(directions):
        h = out[d]
        for b in range(B):
            for t, i, j in _order(name, H, W):
                h[b, i, j] = lam[d, b, i, j] * x[b, i, j]
                if t == 0 or (chunk is not None and t % chunk == 0):
                    continue
                for g in range(G):
                    nbrs = [NEIGHBOUR[name](i, j, k) for k in range(3)]
                    valid = [0 <= ni < H and 0 <= nj < W for ni, nj in nbrs]
                    gate = w[d, b, i, j, g]
                    if normalize:
                        # The contract clamps logits at -80 (sigmoid > 0 in float32).
                        s = np.where(valid, 1.0 / (1.0 + np.exp(-np.maximum(gate, -80.0))), 0.0)
                        a = s / s.sum()
                    else:
                        a = np.where(valid, gate, 0.0)
                    for k, (ni, nj) in enumerate(nbrs):
                        if valid[k]:
                            h[b, i, j, g * per:(g + 1) * per] += a[k] * h[b, ni, nj, g * per:(g + 1) * per]
    return out
