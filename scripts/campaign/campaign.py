"""The fault campaign (issue 13): runs the scenarios, prints the results table, and
writes it (markdown and JSON) into the output directory."""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib import log, TG, TANSU  # noqa: E402
import common  # noqa: E402
from common import OPT, RESULTS, row  # noqa: E402

SCENARIOS = {}


class Tee:
    def __init__(self, *fs):
        self.fs = fs

    def write(self, s):
        for f in self.fs:
            f.write(s)
            f.flush()

    def flush(self):
        for f in self.fs:
            f.flush()


def load():
    from scen_c1c2 import c1, c2, c2a, c2b, c2c
    from scen_c3 import c3
    from scen_c5 import c5
    from scen_c6 import c6, c6a, c6b
    from scen_c7 import c7, c7a, c7b
    SCENARIOS.update({"C1": c1, "C2": c2, "C2a": c2a, "C2b": c2b, "C2c": c2c, "C3": c3, "C5": c5,
                      "C6": c6, "C6a": c6a, "C6b": c6b, "C7": c7, "C7a": c7a, "C7b": c7b})


def table(rows):
    head = ["scenario", "check", "expected", "measured", "result", "cause"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(esc(r[h]) for h in head) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description="twinguard fault campaign")
    ap.add_argument("--quick", action="store_true", help="shrink every scenario (development)")
    ap.add_argument("--out", help="output directory (default /tmp/twinguard-campaign-<time>)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("scenarios", nargs="*", help="C1 C2 C3 C5 C6 C7 (default all), or C2a, C6b, ...")
    a = ap.parse_args()
    load()
    OPT["quick"] = a.quick
    OPT["seed"] = a.seed
    OPT["out"] = a.out or f"/tmp/twinguard-campaign-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(OPT["out"], exist_ok=True)
    sys.stdout = Tee(sys.stdout, open(os.path.join(OPT["out"], "campaign.log"), "a"))
    todo = a.scenarios or ["C1", "C2", "C3", "C5", "C6", "C7"]
    for s in todo:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}; known: {', '.join(SCENARIOS)}")
    ver = subprocess.run([TG, "--version"], capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", common.ROOT, "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()[:80]
    dirty = subprocess.run(["git", "-C", common.ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    try:
        mem_gb = round(int(open("/proc/meminfo").readline().split()[1]) / 1024 / 1024)
    except OSError:
        mem_gb = "?"
    origin = os.environ.get("TWINGUARD_BIN_ORIGIN", TG)
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(origin)))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()}: {os.cpu_count()} cores (shared), {mem_gb} GB RAM, {platform.machine()}, Linux {platform.release()}",
            "twinguard": f"{origin} ({ver}, dev profile, built {built}; run from a private copy)", "tansu": TANSU, "commit": head + (" (+ uncommitted changes in the tree)" if dirty else ""),
            "profile": "quick" if a.quick else "full", "seed": a.seed, "scenarios": todo, "out": OPT["out"]}
    log(f"campaign: {json.dumps(meta)}")
    times = {}
    for s in todo:
        t0 = time.time()
        log(f"===== {s} =====")
        try:
            SCENARIOS[s]()
        except Exception as e:
            traceback.print_exc()
            row(s, "scenario ran to its end", "no harness error", f"{type(e).__name__}: {e}"[:300], False, "campaign harness error (see the log)")
        times[s] = round(time.time() - t0)
        log(f"===== {s} done in {times[s]} s =====")
    meta["seconds"] = times
    md = table(RESULTS)
    print("\n" + md + "\n")
    fails = sum(1 for r in RESULTS if r["result"] == "FAIL")
    print(f"{len(RESULTS)} checks: {sum(1 for r in RESULTS if r['result'] == 'PASS')} PASS, {fails} FAIL, "
          f"{sum(1 for r in RESULTS if r['result'] not in ('PASS', 'FAIL'))} other; scenario seconds {times}")
    with open(os.path.join(OPT["out"], "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": RESULTS}, f, indent=1)
    with open(os.path.join(OPT["out"], "results.md"), "w") as f:
        f.write(f"Run {meta['date']} on {meta['machine']}; {meta['twinguard']}; commit {meta['commit']}; profile {meta['profile']}; seconds {times}\n\n{md}\n")
    log(f"results in {OPT['out']}/results.md and results.json")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
