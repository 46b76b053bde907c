"""The federated evaluation's report: models/federated/report.json and its plots.

Reads what scripts/federated.sh and `twinguard attack` wrote under out/ (each arm's
scores.csv and federation.json, each attack.json) and writes into --out:
- report.json: per arm the test figures (as federated_table.py's rows, plus ε per
  member with DP), per attack run the clean and robust DR per target, search and
  family;
- dr_vs_alpha.png: DR at <= 1 % test FPR against the sites' Dirichlet α (5 sites),
  central as a line;
- dr_vs_poisoned.png: DR at the model's own threshold against the number of
  inverting sites of 10, default rules against the undefended mean;
- robust_vs_budget.png: the ensemble's robust DR against the attack's query budget
  (from each attack.json's evasion_queries: every search is a prefix of itself with
  a larger budget).
Missing arms are skipped and listed under "missing". Used by scripts/federated_report.sh.
"""
import argparse
import datetime
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from federated_table import row  # noqa: E402

ALPHAS = [("cic5-alpha0.05", 0.05), ("cic5-a01", 0.1), ("cic5-a05", 0.5), ("cic5-alpha1", 1.0), ("cic5-alpha10", 10.0)]
POISONED = {0: "cic10-a05", 1: "cic10-invert-k1-{}", 2: "cic10-invert-k2-{}", 3: "cic10-invert-{}", 4: "cic10-invert-k4-{}"}
FIELDS = ["dr", "fpr", "roc_auc", "dr_at_1", "dr_at_1_5"]


def arm(fed, name):
    d = os.path.join(fed, name)
    if not os.path.exists(os.path.join(d, "scores.csv")) and not os.path.exists(os.path.join(d, "local.json")):
        return None
    r = row(name, d, None)
    num = lambda x: float(x.rstrip(" %")) / (100 if x.endswith("%") else 1) if x not in ("—", "") else None
    out = dict(zip(FIELDS, (num(x) for x in r[1:6])))
    out.update({"honest_out": num(r[6]), "poisoned_in": num(r[7]), "kib_per_site": num(r[8])})
    f = os.path.join(d, "federation.json")
    if os.path.exists(f):
        priv = json.load(open(f)).get("privacy")
        if priv:
            out["epsilon"] = {m: p["epsilon"] for m, p in priv["members"].items()}
    return out


def attack(path):
    r = json.load(open(path))
    out = {"model": r["model_version"], "threat": r["threat"], "queries": r["queries"], "clone_identity": r.get("clone_identity", False), "feed_back": r.get("feed_back", False), "targets": {}}
    for t, v in r["targets"].items():
        out["targets"][t] = {
            "clean_dr": v["overall"]["clean_dr"],
            "robust_dr": v["overall"]["robust_dr"],
            "events": v["overall"]["events"],
            "by_method": {m: f["robust_dr"] for m, f in v.get("by_method", {}).items()},
            "by_family": {m: f["robust_dr"] for m, f in v["by_family"].items()},
            "evasion_queries": v.get("evasion_queries", []),
            "robust_detected": v["overall"]["robust_detected"],
        }
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fed", default="out/fed")
    ap.add_argument("--attacks", default="out/attack3")
    ap.add_argument("--out", default="models/federated")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    names = sorted(n for n in os.listdir(a.fed) if os.path.isdir(os.path.join(a.fed, n)))
    arms = {n: x for n in names if (x := arm(a.fed, n)) is not None}
    attacks = {}
    if os.path.isdir(a.attacks):
        for n in sorted(os.listdir(a.attacks)):
            p = os.path.join(a.attacks, n, "attack.json")
            if os.path.exists(p):
                attacks[n] = attack(p)
    wanted = [n for n, _ in ALPHAS] + ["cic-central"] + [v.format(r) for v in POISONED.values() for r in ("robust", "mean")]
    report = {"generated_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "arms": arms, "attacks": attacks, "missing": sorted({w for w in wanted if w not in arms})}
    json.dump(report, open(os.path.join(a.out, "report.json"), "w"), indent=1)

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(al, arms[n]["dr_at_1"]) for n, al in ALPHAS if n in arms and arms[n]["dr_at_1"] is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="federated, 5 sites")
    if "cic-central" in arms:
        ax.axhline(arms["cic-central"]["dr_at_1"], color="gray", ls="--", label="central")
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet α (small = sites see few classes)")
    ax.set_ylabel("test DR at ≤ 1 % test FPR")
    ax.set_title("CICIoMT2024: federated detection vs non-IID-ness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "dr_vs_alpha.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, label in (("robust", "default rules"), ("mean", "undefended (mean)")):
        pts = [(k, arms[p.format(rule)]["dr"]) for k, p in POISONED.items() if p.format(rule) in arms]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel("sites of 10 inverting their labels")
    ax.set_ylabel("test DR at the model's threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("CICIoMT2024: poisoned sites")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "dr_vs_poisoned.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = np.unique(np.round(np.logspace(0, np.log10(300), 40)).astype(int))
    for n, r in attacks.items():
        t = r["targets"].get("ensemble")
        if not t or not t["evasion_queries"] and t["robust_dr"] < t["clean_dr"]:
            continue  # an older attack.json without the query counts
        q = np.array(t["evasion_queries"])
        curve = [(t["robust_detected"] + (q > b).sum()) / t["events"] for b in budgets if b <= r["queries"]]
        ax.plot(budgets[: len(curve)], curve, label=n)
    ax.set_xscale("log")
    ax.set_xlabel("candidates scored per event and search (budget)")
    ax.set_ylabel("robust DR (ensemble)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Evasion: robust DR vs the attacker's budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "robust_vs_budget.png"), dpi=110)
    print(f"{len(arms)} arms, {len(attacks)} attack runs; missing: {', '.join(report['missing']) or 'none'}; written to {a.out}")


if __name__ == "__main__":
    main()
