"""The scikit-learn peer: what a data scientist would build in an afternoon, on the
same rows and splits as a twinguard model, side by side with it.

Input: the dataset file and the per-event scores twinguard wrote for it
(`twinguard eval --model M --scores S.csv`), which give each event's file row, its
split (train / validation / test), its fine label and family, and twinguard's own
scores and verdicts. The peer trains on the same train rows, sets its threshold
on the same validation rows with the same rule (twinguard's
metrics::calibrate_threshold), and is measured on the same test rows.

Peers: RandomForestClassifier(200 trees, defaults) and HistGradientBoostingClassifier
(defaults), both multi-class over the fine labels; the attack score is
1 - P(normal), the class is the most probable attack class. Identity columns are
excluded (see ../shared/datasets/README.md).

Usage: python detect_peer.py --dataset FILE --scores S.csv [--target-fpr 0.01]
"""
import argparse
import json
import math
import sys
import time

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.metrics import f1_score, roc_auc_score

# Columns that are identities, constants, row identifiers or the label itself.
EXCLUDE = {
    # WUSTL-EHMS-2020
    "SrcAddr", "DstAddr", "SrcMac", "DstMac", "Sport", "Dport", "Packet_num",
    "Attack Category", "Label", "Dir", "Flgs",
    # CICIoMT2024
    "attack_type",
}


def threshold_for_fpr(normal, attack, target):
    """The same rule as twinguard's metrics::calibrate_threshold: the conformal bound
    (just above the k-th highest normal score, k = floor(target * (n + 1))), moved to
    the middle of the gap up to the lowest attack score above it."""
    s = np.sort(np.asarray(normal, dtype=float))[::-1]
    n = len(s)
    k = min(max(int(math.floor(target * (n + 1))), 1), n)
    lo = np.nextafter(s[k - 1], np.inf)
    above = np.asarray(attack, dtype=float)
    above = above[above >= lo]
    return lo + (above.min() - lo) / 2.0 if len(above) else lo


def dr_at_fpr(scores, y, fpr):
    """The best detection rate any threshold reaches with test FPR <= fpr: a point
    of the test ROC curve, for comparing models at the same FPR (its threshold is
    read off the test rows, so it is never an operating figure)."""
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    tp = np.cumsum(yy); fp = np.cumsum(~yy)
    last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
    ok = last & (fp <= fpr * max(int(np.sum(~y)), 1))
    return float(tp[ok].max() / max(int(np.sum(y)), 1)) if ok.any() else 0.0


def macro_f1(truth, pred):
    labels = sorted(set(truth) | set(pred))
    return f1_score(truth, pred, labels=labels, average="macro", zero_division=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--scores", required=True, help="twinguard eval --scores CSV for this dataset")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--boosters", action="store_true",
                    help="also compare gradient-boosting engines, binary (LightGBM, perpetual, forust): "
                         "the candidates for twinguard's boosted member, on the same rows")
    a = ap.parse_args()

    d = pd.read_csv(a.dataset, low_memory=False)
    d.columns = [c.strip() for c in d.columns]
    s = pd.read_csv(a.scores)
    if s["row"].max() >= len(d):
        sys.exit(f"{a.scores}: row {s['row'].max()} is past the end of {a.dataset} ({len(d)} rows): not its scores")
    feats = [c for c in d.columns if c not in EXCLUDE and pd.api.types.is_numeric_dtype(d[c]) and d[c].nunique() > 1]
    X = d[feats].astype(float).replace([np.inf, -np.inf], np.nan).to_numpy()
    rows = {p: s[s["split"] == p] for p in ("train", "validation", "test")}
    fam_of = dict(zip(s["label"], s["family"]))
    out = {"dataset": a.dataset, "target_fpr": a.target_fpr, "features": len(feats),
           "rows": {p: len(r) for p, r in rows.items()}, "models": {}}

    def report(name, score_of, class_of, seconds, flagged_of=None):
        """flagged_of: the model's own verdicts (twinguard's ensemble, whose
        threshold was set on out-of-fold scores); else the threshold is set here on
        the validation rows with the same rule."""
        v, t = rows["validation"], rows["test"]
        ty = t["label"].values != "normal"
        sc = score_of(t)
        if flagged_of is None:
            vs, vn = score_of(v), v["label"].values == "normal"
            thr = threshold_for_fpr(vs[vn], vs[~vn], a.target_fpr)
            flagged = sc >= thr
        else:
            flagged = flagged_of(t)
        tp = int(np.sum(flagged & ty)); fp = int(np.sum(flagged & ~ty))
        b = {"dr": tp / max(int(ty.sum()), 1), "fpr": fp / max(int((~ty).sum()), 1), "auc": roc_auc_score(ty, sc), "tp": tp, "fp": fp}
        fam_truth = t["family"].values
        at_thr = np.where(flagged, [fam_of.get(c, c) for c in class_of(t)], "normal")
        b["family_macro_f1_at_threshold"] = macro_f1(list(fam_truth), list(at_thr))
        hit = ty & flagged
        # Among detected attacks: macro over the attack families present.
        b["family_macro_f1_detected"] = (f1_score(list(fam_truth[hit]), list(at_thr[hit]), labels=sorted(set(fam_truth[hit])),
                                                  average="macro", zero_division=0) if hit.any() else float("nan"))
        b["seconds"] = seconds
        b["roc_dr_at_1pct"] = dr_at_fpr(sc, ty, 0.01)
        b["roc_dr_at_0.1pct"] = dr_at_fpr(sc, ty, 0.001)
        out["models"][name] = b

    # twinguard, from its own scores of the same rows.
    report("twinguard ensemble", lambda r: r["ensemble"].values, lambda r: r["class"].values, float("nan"),
           flagged_of=lambda r: r["attack"].values == 1)
    for m in ("rf", "gbdt", "svm", "lstm", "twin"):
        report(f"twinguard {m}", lambda r, m=m: r[m].values, lambda r: r["class"].values, float("nan"))

    ytr = rows["train"]["label"].values
    Xtr = X[rows["train"]["row"].values]
    peers = {
        "sklearn RandomForest(200)": RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=a.seed),
        "sklearn HistGradientBoosting": HistGradientBoostingClassifier(random_state=a.seed),
    }
    for name, model in peers.items():
        t0 = time.time()
        model.fit(np.nan_to_num(Xtr, nan=-1.0) if "Forest" in name else Xtr, ytr)
        secs = time.time() - t0
        classes = list(model.classes_)
        normal = classes.index("normal")

        def proba(r, model=model, name=name):
            x = X[r["row"].values]
            return model.predict_proba(np.nan_to_num(x, nan=-1.0) if "Forest" in name else x)

        def score_of(r):
            return 1.0 - proba(r)[:, normal]

        def class_of(r):
            p = proba(r).copy()
            p[:, normal] = -1.0
            return np.array(classes)[p.argmax(axis=1)]

        report(name, score_of, class_of, secs)
        # Argmax over all classes (normal included): the peer's own classifier.
        t = rows["test"]
        am = np.array(classes)[proba(t).argmax(axis=1)]
        out["models"][name]["family_macro_f1_argmax"] = macro_f1(list(t["family"].values), [fam_of.get(c, c) for c in am])

    if a.boosters:
        boosters(a, X, rows, report, out)

    print(f"{a.dataset}: {out['rows']} rows (train/validation/test), {len(feats)} features, target FPR {a.target_fpr:.2%}")
    print("DR, FPR: at the threshold set on the validation rows. ROC DR@1%, @0.1%: best test DR at that test FPR (comparison only).")
    print(f"{'model':<32} {'DR':>7} {'FPR':>7} {'ROC-AUC':>8} {'DR@1%':>7} {'DR@0.1%':>7} {'fam-F1@thr':>10} {'fam-F1 det':>10} {'fit s':>7}")
    for name, b in out["models"].items():
        print(f"{name:<32} {b['dr']:7.4f} {b['fpr']:7.4f} {b['auc']:8.4f} {b['roc_dr_at_1pct']:7.4f} {b['roc_dr_at_0.1pct']:7.4f} "
              f"{b['family_macro_f1_at_threshold']:10.4f} {b['family_macro_f1_detected']:10.4f} {b['seconds']:7.1f}")
    for name, b in out["models"].items():
        if "us_per_row_single" in b:
            print(f"{name}: {b['us_per_row_single']:.0f} us to score one row from Python (binding overhead included)")
    for name, b in out["models"].items():
        if "family_macro_f1_argmax" in b:
            print(f"{name}: family macro-F1 by argmax over all classes {b['family_macro_f1_argmax']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=float)


def boosters(a, X, rows, report, out):
    """Binary boosters on the raw columns of the same rows: quality, fit time and
    scoring cost per row (one row at a time, as a stream scores)."""
    import lightgbm
    import perpetual
    import forust
    ytr = rows["train"]["label"].values != "normal"
    Xtr = X[rows["train"]["row"].values]
    engines = {
        "LightGBM 4.7 (binary)": lambda: lightgbm.LGBMClassifier(random_state=a.seed, verbose=-1),
        "perpetual 2.3 (binary)": lambda: perpetual.PerpetualBooster(objective="LogLoss", budget=0.5, seed=a.seed),
        "forust 0.8 (binary)": lambda: forust.GradientBooster(objective_type="LogLoss", seed=a.seed),
    }
    for name, make in engines.items():
        model = make()
        t0 = time.time()
        model.fit(Xtr, ytr.astype(int) if "forust" in name else ytr)
        secs = time.time() - t0

        def score_of(r, model=model, name=name):
            x = X[r["row"].values]
            if "LightGBM" in name:
                return model.predict_proba(x)[:, 1]
            if "perpetual" in name:
                return np.asarray(model.predict_proba(x))[:, 1]
            return np.asarray(model.predict(x))  # forust: log-odds, monotone in P

        report(name, score_of, lambda r: np.full(len(r), "attack"), secs)
        sample = X[rows["test"]["row"].values[:300]]
        t0 = time.time()
        for i in range(len(sample)):
            score_of(rows["test"].iloc[i:i + 1])
        out["models"][name]["us_per_row_single"] = (time.time() - t0) / len(sample) * 1e6
        out["models"][name]["family_macro_f1_at_threshold"] = float("nan")
        out["models"][name]["family_macro_f1_detected"] = float("nan")


if __name__ == "__main__":
    main()
