"""C1 crashes and C2 broker faults."""

import json
import os
import random
import signal
import time

from lib import Tansu, Proc, log, free_port, wait_for, produce, to_toml
from common import (OPT, World, Run, row, size, simulate, input_total, nothing_lost, finish_reference, Sampler,
                    EventGen, enc)

# C1/C7 pipeline settings: small batches (many commit points), a 1 s expiry tick, and an
# idle TTL short enough that the ghost devices below expire mid-run (tombstones in flight).
# The gate held constant: the reference runs over a backlog (after the fault run), so
# the response-time bound (event appended -> command sent) would suspend automation
# there and not in the fault run; it is set out of reach in both.
GATE_CONSTANT = {"gating": {"max_response_ms": 86400000.0}}
C1_EXTRA = {"batch": {"max_records": 50, "expiry_interval_secs": 1},
            "state": {"idle_ttl_secs": 3600}, "decode": {"max_future_secs": 600}, **GATE_CONSTANT}


def sim_span_ms(devices, events):
    # pipeline/src/sim.rs SimConfig::new: the simulated run ends now.
    return int(events / devices * 1100.0 * 2.0) + 60_000


def produce_ghosts(w, devices, events, n=20, seed=1, tag="ghost"):
    """n devices with one event each, dated 4 h before the simulated stream: their twins
    are idle past the TTL (3600 s) by any rule (old: watermark - TTL; new: median - 2 TTL),
    so the next expiry ticks after they are processed write their tombstones."""
    span = sim_span_ms(devices, events)
    start = int(time.time() * 1000) - span - 4 * 3_600_000
    g = EventGen(n, seed, start, prefix=f"{w.name}-{tag}")
    recs = [(g.ids[i].encode(), enc(g.event(i, start + i * 1000))) for i in range(n)]
    prod = w.tansu.producer(**{"batch.num.messages": 1, "linger.ms": 0})
    coords, errs = produce(prod, w.input, recs)
    return coords


def preload_alerts(w, run, n):
    """n alert records on the run's alerts topic (read at start by the gate's catch-up)."""
    tmpl = None
    from lib import read_values
    vals = read_values(w.tansu.bootstrap, run.topics["alerts"], w.n)
    for v in vals:
        try:
            tmpl = json.loads(v)
            break
        except Exception:
            pass
    recs = []
    for i in range(n):
        a = dict(tmpl) if tmpl else {"v": 1, "device_id": "preload", "score": 0.5}
        a["alert_id"] = f"campaign-preload-{i}"
        recs.append((str(a.get("device_id", "preload")).encode(), json.dumps(a).encode()))
    coords, errs = produce(w.tansu.producer(), run.topics["alerts"], recs)
    return len(recs) - len(errs), tmpl is not None


def c1():
    sc = "C1"
    rnd = random.Random(OPT["seed"])
    devices = 30
    events = size(6000, 40000)
    n_random = size(3, 20)
    w = World("c1")
    try:
        rate = events / size(70, 200)
        sim = simulate(w, devices, events, 5, rate=rate, malformed=0.01)
        f = Run(w, "fault", C1_EXTRA)
        f.follow()
        t_recover, restores = [], []
        not_ready = []
        # 1) seeded random kills, each 0.3..6 s after /readyz answered 200
        last_kill = None
        for i in range(n_random):
            p = f.start()
            if not f.wait_ready(p, 120):
                not_ready.append((p.name, p.alive(), p.last_error()))
                f.kill(p) if p.alive() else f.note_exit(p)
                continue
            if last_kill:
                t_recover.append(time.time() - last_kill)
            time.sleep(rnd.uniform(0.3, 6.0))
            f.kill(p)
            last_kill = time.time()
        row(sc, f"{n_random} SIGKILLs at seeded random points (0.3-6 s after ready)", f"{n_random} kills, each incarnation ready",
            f"{n_random - len(not_ready)} ready and killed; kill->next ready mean {sum(t_recover) / max(1, len(t_recover)):.1f}s max {max(t_recover or [0]):.1f}s",
            not not_ready, "; ".join(f"{n}: alive={a} {e}" for n, a, e in not_ready[:2]))
        # 2) targeted: during a restore (between `rebalance assign` and `twins restored`)
        p = f.start()
        i = p.wait_log(["rebalance", "assign"], 120)
        f.kill(p)
        landed = i is not None and not p.log_lines("twins restored")
        row(sc, "targeted kill: during a restore", "killed between `rebalance assign` and `twins restored`",
            "landed" if landed else ("after the restore" if i is not None else "no assignment seen"), landed if i is not None else False,
            "" if i is not None else p.last_error())
        # 3) targeted: inside a revoke (a second instance joins the group)
        a = f.start()
        ok_a = f.wait_ready(a, 120)
        after = len(a.log_text().splitlines())
        b = f.start(fresh=False)
        i = a.wait_log(["rebalance", "revoke"], 90, after=after)
        f.kill(a)
        landed = i is not None
        b_ready = f.wait_ready(b, 60)
        f.term(b)
        row(sc, "targeted kill: inside a revoke (second instance joins)", "killed at the `rebalance revoke` line",
            f"{'landed' if landed else 'no revoke seen'}; the joiner {'became ready' if b_ready else 'never became ready (stopped after 60 s)'}",
            landed and ok_a, "" if landed else a.last_error())
        # 4) targeted: during the drain after SIGTERM
        c = f.start()
        f.wait_ready(c, 120)
        time.sleep(1.0)
        f.scrape(c)
        os.kill(c.pid, signal.SIGTERM)
        time.sleep(0.02)
        rc = c.kill9()
        f.exits.append((c.name, "SIGKILL", rc))
        row(sc, "targeted kill: 20 ms after SIGTERM (in the drain)", "killed mid-drain", f"rc {rc}", rc in (-9, 137),
            "exited before the kill" if rc not in (-9, 137) else "")
        # 5) targeted: at an expiry tick that expired twins (tombstones in flight): 20
        # ghost devices with events 4 h older than the stream, produced just before.
        produce_ghosts(w, devices, events)
        d = f.start()
        f.wait_ready(d, 120)
        i = None
        deadline = time.time() + 30
        while time.time() < deadline and d.alive() and i is None:
            for l in d.log_lines("status", "expired="):
                if "expired=0 " not in l + " ":
                    i = l
                    break
            time.sleep(0.005)
        f.kill(d)
        row(sc, "targeted kill: at an expiry tick that removed twins (expiry_interval_secs=1, 20 idle ghost twins)",
            "killed at the tick's status line, tombstones in flight",
            "landed (" + i.split("expired=")[1].split()[0] + " expired)" if i else "no tick with expiries seen in 30 s", i is not None,
            "" if i else d.last_error())
        # 6) targeted: during the gate's catch-up (alerts and feedback read to their end at start)
        n_alerts, real = preload_alerts(w, f, size(5000, 50000))
        e = f.start()
        i = e.wait_log(["starting pipeline"], 60, every=0.005)
        time.sleep(0.05)
        f.kill(e)
        landed = i is not None and not e.log_lines("rebalance")
        row(sc, f"targeted kill: during the gate catch-up ({n_alerts} preloaded alerts{'' if real else ', synthetic'})",
            "killed after `starting pipeline`, before any assignment", "landed" if landed else "missed", landed,
            "" if landed else ("no start line" if i is None else "assignment already happened"))
        # final incarnation: runs to the end of the input
        g = f.start()
        f.wait_ready(g, 120)
        sim.wait(600)
        total = input_total(w)
        done = f.wait_complete(total, size(240, 600), [g])
        row(sc, "after the kills: every input coordinate answered", total, len(f.follow().covered()), done,
            "" if done else g.last_error())
        f.quiesce(g)
        f.term(g)
        restore_ms = []
        for p in f.procs:
            for l in p.log_lines("twins restored"):
                try:
                    restore_ms.append(int(l.split("millis=")[1].split()[0]))
                except Exception:
                    pass
        ref = finish_reference(sc, w, C1_EXTRA, total, 600)
        r = nothing_lost(sc, ref, f)
        row(sc, "measured: duplicates and restore time", "-", f"{r['dups']} duplicate verdicts over {len(f.exits)} incarnations; restore max {max(restore_ms or [0])} ms",
            "INFO")
    finally:
        w.close()


# ----------------------------------------------------------------------- C2

C2_TIMEOUT_MS = 30000


def c2():
    c2a()
    c2b()
    c2c()


def c2a():
    sc = "C2a"
    pauses = [2, size(5, 15), C2_TIMEOUT_MS // 1000 + 15]
    extra = {"kafka": {"producer": {"message.timeout.ms": str(C2_TIMEOUT_MS)}}, "batch": {"max_records": 200, "expiry_interval_secs": 2}, **GATE_CONSTANT}
    w = World("c2a")
    try:
        rate = size(150, 400)
        dur = sum(pauses) + size(90, 150)
        sim = simulate(w, 30, int(rate * dur), 9, rate=rate, malformed=0.01)
        f = Run(w, "fault", extra)
        f.follow()
        p = f.start()
        f.wait_ready(p, 120)
        cur = [p]
        smp = Sampler(lambda: cur[0])
        smp.start()
        for d in pauses:
            time.sleep(5)
            long = d * 1000 > C2_TIMEOUT_MS
            smp.phase = f"pause {d}s"
            t0 = time.time()
            w.tansu.pause()
            time.sleep(d)
            w.tansu.resume()
            t_resume = time.time()
            smp.phase = f"after {d}s"
            paused = [s for s in smp.samples if s["phase"] == f"pause {d}s"]
            rss = [s["rss_kb"] for s in paused if s.get("rss_kb")]
            hz = sorted(set(str(s.get("healthz")) for s in paused))
            if not long:
                alive = p.alive() and wait_for("exit after the pause", lambda: not p.alive(), 5) is None
                cause = ""
                if not alive:
                    cause = f"exited rc={p.rc}: {p.last_error()}"
                    f.note_exit(p)
                    p = f.start()
                    cur[0] = p
                    f.wait_ready(p, 120)
                target = input_total(w)
                caught = f.wait_complete(target, 120, [p])
                row(sc, f"broker SIGSTOPped {d} s (< message.timeout.ms {C2_TIMEOUT_MS} ms; session.timeout.ms 6000)",
                    "no exit; outputs catch up with the input within 120 s",
                    f"{'alive' if alive else 'EXITED (restarted in a fresh group)'}; caught up {'%.0fs after the resume' % (time.time() - t_resume) if caught else 'NO'}; RSS {min(rss or [0]) // 1024}-{max(rss or [0]) // 1024} MB; /healthz {hz}",
                    alive and caught, cause)
            else:
                exited = wait_for("exit after the long pause", lambda: not p.alive(), 60) is True
                rc = p.rc
                text = p.log_text()
                named = any(x in text for x in ("delivery", "timed out", "Message timed out", "MsgTimedOut"))
                committed = w.tansu.committed(f.group, w.input, w.n)
                f.follow().to_end()
                cov = f.follow().covered()
                beyond = [(q, o) for q, upto in committed.items() for o in range(upto) if (q, o) not in cov]
                if exited:
                    f.exits.append((p.name, "fail-stop after the broker pause (expected)", rc))
                    ok = rc == 1 and named and not beyond
                    meas = f"exited rc={rc}{' naming a delivery error' if named else ' without naming a delivery error'}; /healthz during pause {hz}; {len(beyond)} committed offsets without output"
                else:
                    ok = not beyond
                    meas = f"kept running; /healthz during pause {hz}; {len(beyond)} committed offsets without output"
                row(sc, f"broker SIGSTOPped {d} s (> message.timeout.ms {C2_TIMEOUT_MS} ms)",
                    "fail-stop (exit 1 naming the delivery error) or ride it out; committed offsets never past outputs",
                    meas, ok, p.last_error() if not ok else "")
                if exited:
                    p = f.start()
                    cur[0] = p
                    f.wait_ready(p, 120)
        sim.wait(900)
        total = input_total(w)
        done = f.wait_complete(total, 300, [p])
        smp.stop()
        rss = [s["rss_kb"] for s in smp.samples if s.get("rss_kb")]
        row(sc, "after the pauses: every input coordinate answered", total, len(f.follow().covered()), done, "" if done else p.last_error())
        row(sc, "measured: RSS over the run (sampled 1/s)", "plateau", f"{min(rss or [0]) // 1024}-{max(rss or [0]) // 1024} MB", "INFO")
        f.quiesce(p)
        f.term(p)
        ref = finish_reference(sc, w, extra, total, 600)
        nothing_lost(sc, ref, f)
    finally:
        w.close()


def c2b():
    sc = "C2b"
    durable = os.environ.get("TANSU_DURABLE_BIN")
    if not durable or not os.access(durable, os.X_OK):
        row(sc, "broker SIGKILLed and restarted on durable storage (sqlite)", "nothing lost", "not run: needs durable tansu",
            "NOT RUN", "no durable tansu: scripts/campaign.sh builds one unless CAMPAIGN_NO_DURABLE_INSTALL=1 (or set TANSU_DURABLE_BIN to a tansu built with `--features dynostore,libsql`)")
        return
    dir_ = os.path.join(OPT["out"], "c2b")
    os.makedirs(dir_, exist_ok=True)
    # tansu 0.6 takes the path after "sqlite:///" as relative: four slashes for an absolute one.
    t = Tansu(dir_, binary=durable, storage=f"sqlite:///{os.path.abspath(dir_)}/tansu.db")
    w = World("c2b", tansu=t)
    try:
        rate = size(150, 400)
        sim = simulate(w, 30, int(rate * size(60, 120)), 11, rate=rate, malformed=0.01, extra_producer={"message.timeout.ms": "600000"})
        f = Run(w, "fault", GATE_CONSTANT)
        f.follow()
        p = f.start()
        f.wait_ready(p, 120)
        time.sleep(10)
        t.kill()
        time.sleep(5)
        t.start()
        exited = wait_for("pipeline exit or progress", lambda: not p.alive(), 60)
        row(sc, "broker SIGKILLed 10 s after ready, restarted 5 s later on the same durable storage",
            "the pipeline rides it out (no exit)", f"exited rc={p.rc}" if exited else "alive 60 s after the restart", not exited,
            "" if not exited else f"see {p.name}.log")
        if exited:
            f.note_exit(p)
            p = f.start()
        sim.wait(900)
        total = input_total(w)
        done = f.wait_complete(total, 300, [p])
        row(sc, "after the broker restart: every input coordinate answered", total, len(f.follow().covered()), done)
        f.term(p)
        ref = finish_reference(sc, w, GATE_CONSTANT, total, 600)
        nothing_lost(sc, ref, f)
    finally:
        w.close()


def c2c():
    sc = "C2c"
    dir_ = os.path.join(OPT["out"], "c2c")
    os.makedirs(dir_, exist_ok=True)
    t = Tansu(dir_)
    w = World("c2c", start=False, tansu=t)
    try:
        f = Run(w, "fault", {}, create=False)
        p = f.start()
        down = size(15, 30)
        t0 = time.time()
        ready_codes, health_codes = set(), set()
        answered = False  # the endpoint binds a moment after the process starts
        while time.time() - t0 < down and p.alive():
            r, h = p.get("/readyz")[0], p.get("/healthz")[0]
            answered = answered or r is not None
            if answered:
                ready_codes.add(r)
                health_codes.add(h)
            time.sleep(0.5)
        alive = p.alive()
        lines = [l for l in p.log_text().splitlines() if (" WARN " in l or " ERROR " in l or " INFO " in l)]
        row(sc, f"pipeline started with the broker down ({down} s)", "keeps running, waits and retries",
            f"alive after {down}s" if alive else f"exited rc={p.rc} after {p.rc is not None and time.time() - p.started:.1f}s",
            alive, "" if alive else p.last_error())
        row(sc, "/readyz while the broker is down (from the endpoint's first answer on)", "503 (not ready)", sorted(str(c) for c in ready_codes),
            alive and answered and ready_codes <= {503}, "" if alive else "process gone: nothing answers")
        row(sc, "/healthz while the broker is down (alive, waiting)", "200", sorted(str(c) for c in health_codes),
            alive and answered and health_codes <= {200}, "" if alive else "process gone: nothing answers")
        row(sc, "a clear log line while waiting", "a WARN naming the unreachable broker", (lines[-1][-200:] if lines else "no log"),
            alive and any("broker" in l.lower() or "connect" in l.lower() for l in lines if " WARN " in l), "")
        t.start()
        if not alive:
            f.note_exit(p)
            row(sc, "after the broker starts: ready and processing", "ready, every event answered", "not tested: the process had exited", False,
                "the pipeline exits when the broker is unreachable at start")
            return
        ok = f.wait_ready(p, 120)
        g = EventGen(10, 3, int(time.time() * 1000) - 600_000)
        recs = [(g.ids[i % 10].encode(), enc(g.event(i % 10))) for i in range(500)]
        wait_for("input topic", lambda: w.input in w.tansu.admin().list_topics(timeout=5).topics, 60)
        produce(w.tansu.producer(**{"batch.num.messages": 1, "linger.ms": 0}), w.input, recs)
        done = f.wait_complete(500, 120, [p])
        row(sc, "after the broker starts: ready and processing", "ready, every event answered", f"ready={ok}, {len(f.follow().covered())}/500 answered",
            ok and done, "" if ok and done else p.last_error())
        f.term(p)
    finally:
        w.close()
