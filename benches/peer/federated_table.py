"""Federated runs side by side: one markdown row per model directory.

Reads DIR/scores.csv (written by `twinguard eval --scores`) and, for a federated
model, DIR/federation.json; for the local-only arm DIR/local.json (the median site). Prints, on the test rows: DR and FPR at the model's
threshold, ROC-AUC, the best test DR at test FPR <= 1 % and <= 1.5 % (read off the
test ROC: how models compare at a matched FPR, never an operating figure), the
recall of one class (--class, e.g. the class a targeted flip relabelled), and for
a federation: honest sites excluded by some member, poisoned sites accepted by
some member (round 0's feature moments, taken from every site with the
federation's features, do not count), KiB sent per site (median). Used by scripts/federated.sh.
"""
import argparse
import json
import os

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve


def dr_at(y, s, fpr_max):
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= fpr_max + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def local_row(name, d, klass):
    # The local-only arm: every site alone; the median site, and who cannot stand alone.
    res = json.load(open(os.path.join(d, "local.json")))
    ok = [r for r in res if r["error"] is None]
    med = lambda k: float(np.median([r[k] for r in ok])) if ok else float("nan")
    out = [f"{name} (median of {len(ok)} sites; {len(res) - len(ok)} cannot stand alone)", f"{med('detection_rate'):.4f}", f"{100 * med('fpr'):.2f} %", f"{med('roc_auc'):.4f}", "—", f"{med('dr_at_1_5'):.4f}"]
    if klass:
        out.append("—")
    return out + ["—", "—", "—"]


def row(name, d, klass):
    if os.path.exists(os.path.join(d, "local.json")):
        return local_row(name, d, klass)
    df = pd.read_csv(os.path.join(d, "scores.csv"))
    t = df[df["split"] == "test"]
    y = (t["family"] != "normal").to_numpy()
    s = t["ensemble"].to_numpy()
    a = t["attack"].to_numpy().astype(bool)
    dr = a[y].mean()
    fpr = a[~y].mean()
    out = [name, f"{dr:.4f}", f"{100 * fpr:.2f} %", f"{roc_auc_score(y, s):.4f}", f"{dr_at(y, s, 0.01):.4f}", f"{dr_at(y, s, 0.015):.4f}"]
    if klass:
        m = (t["label"] == klass).to_numpy()
        out.append(f"{a[m].mean():.4f}" if m.any() else "—")
    f = os.path.join(d, "federation.json")
    if os.path.exists(f):
        fed = json.load(open(f))
        poisoned = {x["site"] for x in fed["sites"] if x["poisoned"]}
        honest_out, poisoned_in = set(), set()
        for member, ds in fed["decisions"].items():
            for x in ds:
                if not x["accepted"] and x["site"] not in poisoned:
                    honest_out.add(x["site"])
                if x["accepted"] and x["site"] in poisoned and member != "round0":
                    poisoned_in.add(x["site"])
        kib = np.median([sum(x["bytes"].values()) / 1024 for x in fed["sites"]])
        out += [str(len(honest_out)), str(len(poisoned_in)), f"{kib:.0f}"]
    else:
        out += ["—", "—", "—"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=DIR")
    ap.add_argument("--class", dest="klass", default=None)
    a = ap.parse_args()
    head = ["run", "DR", "FPR", "ROC-AUC", "DR@1 %", "DR@1.5 %"] + ([f"recall {a.klass}"] if a.klass else []) + ["honest out", "poisoned in", "KiB/site"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for r in a.runs:
        name, d = r.split("=", 1)
        print("| " + " | ".join(row(name, d, a.klass)) + " |", flush=True)


if __name__ == "__main__":
    main()
