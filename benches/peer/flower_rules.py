"""Reference outputs of Flower's robust aggregation rules for twinguard's tests.

Writes models/src/federated/flower_fixture.json: seeded update vectors (honest
sites, an inverted one, a boosted one, a "little is enough" one) and what Flower
(flwr, `flwr.server.strategy.aggregate` and `flwr.serverapp.strategy.multikrum`)
computes on them: the Multi-Krum selection, its mean, the coordinate-wise median
and the trimmed mean. `models/src/federated/robust_tests.rs` checks twinguard's
rules against it. Run: scripts/peer.sh --flower (or this file with the peer venv).
"""
import json
import sys

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg, _compute_distances


def krum_selection(updates, f, keep):
    # The selection step of aggregate_krum / select_multikrum, returned as indices.
    d = _compute_distances([[u] for u in updates])
    num_closest = max(1, len(updates) - f - 2)
    scores = [np.sum(d[i, np.argsort(d[i])[1:num_closest + 1]]) for i in range(len(updates))]
    return sorted(int(i) for i in np.argsort(scores)[:keep]), [float(s) for s in scores]


def case(seed, n, dim, bad):
    rng = np.random.default_rng(seed)
    honest = [1.0 + 0.1 * rng.standard_normal(dim) for _ in range(n - bad)]
    mu, sd = np.mean(honest, axis=0), np.std(honest, axis=0)
    attackers = [-honest[0], 10.0 * honest[1], mu - 1.5 * sd][:bad]
    updates = honest + attackers
    f = bad
    keep = n - f
    sel, scores = krum_selection(updates, f, keep)
    results = [([u], 1) for u in updates]
    return {
        "updates": [u.tolist() for u in updates],
        "f": f,
        "multikrum_selected": sel,
        "multikrum_scores": scores,
        "multikrum_mean": aggregate_krum(results, f, keep)[0].tolist(),
        "median": aggregate_median(results)[0].tolist(),
        "trimmed_mean": aggregate_trimmed_avg(results, (f + 0.5) / n)[0].tolist(),
    }


if __name__ == "__main__":
    import flwr
    out = sys.argv[1] if len(sys.argv) > 1 else "models/src/federated/flower_fixture.json"
    cases = [case(7, 10, 8, 3), case(8, 5, 6, 1), case(9, 7, 175, 2)]
    with open(out, "w") as fh:
        json.dump({"flwr": flwr.__version__, "cases": cases}, fh)
    print(f"wrote {out} (flwr {flwr.__version__}, {len(cases)} cases)")
