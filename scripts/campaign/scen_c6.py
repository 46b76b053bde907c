"""C6: memory pressure: a memory-capped pipeline with a backlog while the broker is
paused; 200,000 distinct devices with `max_twins`; `twinguard sql` over 1,000,000 twins."""

import json
import os
import time

from lib import Proc, Pg, log, free_port, wait_for, produce, read_all, to_toml
from common import OPT, World, Run, row, size, Sampler, EventGen, enc, input_total

CG_ROOT = "/sys/fs/cgroup/memory"


def memory_cap(name, mb):
    """A memory cap for one process: a cgroup v1 memory group if this machine lets us make
    one (it does here: /sys/fs/cgroup/memory is writable; v2 has no memory controller and
    systemd-run has no systemd to talk to), else None (the caller uses prlimit --as)."""
    path = os.path.join(CG_ROOT, f"twinguard-campaign-{name}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(mb * 1024 * 1024))
        try:
            with open(os.path.join(path, "memory.memsw.limit_in_bytes"), "w") as f:
                f.write(str(mb * 1024 * 1024))
        except OSError:
            pass
        return path
    except OSError as e:
        log(f"no cgroup memory cap ({e})")
        return None


def oom_kills(cg):
    try:
        for line in open(os.path.join(cg, "memory.oom_control")):
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        return None
    return 0


def cg_peak_mb(cg):
    try:
        return int(open(os.path.join(cg, "memory.max_usage_in_bytes")).read()) // (1024 * 1024)
    except OSError:
        return None


def remove_cap(cg):
    if cg:
        try:
            os.rmdir(cg)
        except OSError:
            pass


def c6():
    c6a()
    c6b()


def c6a():
    sc = "C6a"
    cap_mb = 768
    w = World("c6a")
    cg = memory_cap("c6a", cap_mb)
    try:
        n = size(40_000, 200_000)
        g = EventGen(size(200, 1000), 5, int(time.time() * 1000) - 3600_000, step_ms=10, prefix="c6a")
        recs = ((g.ids[i % len(g.ids)].encode(), enc(g.event(i % len(g.ids)))) for i in range(n))
        coords, _ = produce(w.tansu.producer(**{"linger.ms": 50}), w.input, recs)
        acked = set(c for c in coords if c)
        # A session timeout longer than the pause: this scenario measures memory under
        # backpressure; group eviction during a broker pause is C2a's subject.
        f = Run(w, "fault", {"batch": {"max_records": 1000}, "kafka": {"consumer": {"session.timeout.ms": "120000"}}})
        f.follow()
        p = f.start(cgroup=cg, log_level="warn")
        smp = Sampler(lambda: p)
        smp.start()
        f.wait_ready(p, 120)
        wait_for("10 % processed", lambda: len(f.follow().covered()) >= n // 10 or not p.alive() or f.follow().poll(0.5) < 0, 120)
        pause = size(20, 60)
        smp.phase = "paused"
        w.tansu.pause()
        time.sleep(pause)
        w.tansu.resume()
        smp.phase = "resumed"
        done = f.wait_complete(acked, size(180, 600), [p])
        smp.stop()
        paused = [s["rss_kb"] for s in smp.samples if s["phase"] == "paused" and s.get("rss_kb")]
        half = len(paused) // 2
        plateau = bool(paused) and max(paused[half:] or [0]) <= 1.1 * max(paused[:half] or [1]) + 32 * 1024
        kills = oom_kills(cg) if cg else None
        row(sc, f"backlog of {n} records, broker SIGSTOPped {pause} s, pipeline under a {cap_mb} MB cap ({'cgroup v1 memory' if cg else 'none available'})",
            "no OOM kill, no exit; RSS plateaus while paused", f"alive={p.alive()}, OOM kills {kills}, RSS while paused {min(paused or [0]) // 1024}-{max(paused or [0]) // 1024} MB, cgroup peak {cg_peak_mb(cg) if cg else '?'} MB",
            p.alive() and not kills and plateau, "" if p.alive() else p.last_error())
        row(sc, "after the pause: every input coordinate answered", len(acked), len(f.follow().covered() & acked), done)
        if p.alive():
            f.term(p)
    finally:
        w.close()
        remove_cap(cg)


def c6b():
    sc = "C6b"
    max_twins = size(5_000, 50_000)
    n = size(20_000, 200_000)
    w = World("c6b")
    try:
        g = EventGen(n, 6, int(time.time() * 1000) - 3600_000, prefix="c6b")
        recs = ((g.ids[i].encode(), enc(g.event(i))) for i in range(n))
        produce(w.tansu.producer(**{"linger.ms": 50}), w.input, recs)
        extra = {"state": {"max_twins": max_twins}, "batch": {"max_records": 1000, "expiry_interval_secs": 1}}
        f = Run(w, "fault", extra, audit=False)
        f.follow()
        p = f.start(log_level="warn,twinguard::obs::events=info")
        smp = Sampler(lambda: p, every=0.5)
        smp.start()
        done = f.wait_complete(n, size(180, 900), [p])
        time.sleep(3)
        smp.stop()
        tw = [(s["t"], s["twins"], s.get("records_in") or 0) for s in smp.samples if s.get("twins") is not None]
        peak = max((x for _, x, _ in tw), default=None)
        # twins created between two ticks: at most the records taken in between two
        # consecutive status lines (one per expiry tick, each with records_in)
        ins, after_sweep = [], []
        for l in p.log_lines("status", "records_in="):
            try:
                ins.append(int(l.split("records_in=")[1].split()[0]))
                after_sweep.append(int(l.split(" twins=")[1].split()[0]))
            except (IndexError, ValueError):
                pass
        per_tick = max((b - a for a, b in zip(ins, ins[1:])), default=0)
        if not ins:
            per_tick = n
        final = tw[-1][1] if tw else None
        row(sc, f"{n} distinct devices with max_twins = {max_twins}", f"twins <= max_twins + created between two ticks (<= {max_twins + per_tick:.0f}); final <= {max_twins}",
            f"peak {peak}, final {final}; twins right after each tick's sweep: max {max(after_sweep or [0])}",
            peak is not None and peak <= max_twins + per_tick and final <= max_twins and p.alive(),
            (p.last_error() if not p.alive() else "") or (f"a sweep left {max(after_sweep)} twins (> max_twins) while records kept coming" if max(after_sweep or [0]) > max_twins else ""))
        row(sc, "every input coordinate answered", n, len(f.follow().covered()), done, "" if done else p.last_error())
        # a template twin for C6c
        tmpl = []
        read_all(w.tansu.bootstrap, f.topics["changelog"], w.n, lambda m: tmpl.append((m.key(), m.value())) if m.value() and len(tmpl) < 1 else None)
        if p.alive():
            f.term(p)
    finally:
        w.close()
    c6c(tmpl[0] if tmpl else None)


def c6c(tmpl):
    sc = "C6c"
    n = size(100_000, 1_000_000)
    if tmpl is None:
        row(sc, f"twinguard sql over {n} twins", "ready and counting every twin", "not run: no template twin from C6b", "NOT RUN")
        return
    w = World("c6c")
    try:
        key, val = tmpl
        twin = json.loads(val)
        old = key.decode()
        topic = f"{w.name}.changelog"
        w.tansu.create_topics([(topic, w.n, True)] + [(f"c6c.{t}", w.n, False) for t in ("verdicts", "alerts", "commands")])
        prod = w.tansu.producer(**{"linger.ms": 100, "batch.size": 1000000, "compression.type": "lz4"})
        base = json.dumps(twin, separators=(",", ":"))
        t0 = time.time()
        errs = []

        def cb(err, msg):
            if err:
                errs.append(str(err))
        for i in range(n):
            dev = f"c6c-{i:07d}"
            part = i % w.n
            v = base.replace(old, dev).replace(f'"partition":{twin.get("partition")}', f'"partition":{part}', 1)
            while True:
                try:
                    prod.produce(topic, key=dev.encode(), value=v.encode(), partition=part, on_delivery=cb)
                    break
                except BufferError:
                    prod.poll(0.05)
            if i % 5000 == 0:
                prod.poll(0)
        prod.flush(900)
        log(f"C6c: {n} changelog records ({len(base)} B each) in {time.time() - t0:.0f}s, {len(errs)} errors")
        sql_port, http_port = free_port(), free_port()
        cfg = {"kafka": {"brokers": w.tansu.bootstrap, "group_id": "c6c-sql"},
               "topics": {"input": w.input, "changelog": topic, "verdicts": "c6c.verdicts", "alerts": "c6c.alerts",
                          "commands": "c6c.commands", "create": True, "partitions": w.n},
               "sql": {"listen": f"127.0.0.1:{sql_port}", "users": [{"name": "analyst", "password": "campaign-pw"}]},
               "http": {"listen": f"127.0.0.1:{http_port}"}}
        path = os.path.join(w.dir, "sql.toml")
        open(path, "w").write(to_toml(cfg))
        cg = memory_cap("c6c", 8192)  # protects the shared machine; recorded if it triggers
        p = Proc(w.dir, "sql", ["sql", "--config", path], http_port=http_port, cgroup=cg)
        smp = Sampler(lambda: p, every=2, metrics=False)
        smp.start()
        t0 = time.time()
        ready = wait_for("twinguard sql ready", lambda: p.ready() or not p.alive(), size(300, 900), 1) and p.alive() and p.ready()
        t_ready = time.time() - t0
        count, err = None, ""
        if ready:
            try:
                c = Pg(sql_port, timeout=120).login("analyst", "campaign-pw")
                count = int(c.query("select count(*) from twins")[0][0])
                c.close()
            except Exception as e:
                err = str(e)
        time.sleep(5)
        hz = p.get("/healthz")[0]
        smp.stop()
        rss = max((s.get("rss_kb") or 0 for s in smp.samples), default=0)
        row(sc, f"twinguard sql over {n} twins (changelog records of {len(base)} B)", f"/readyz 200, count(*) = {n}, /healthz 200",
            f"ready={ready} after {t_ready:.0f}s, count={count}, /healthz {hz}, peak RSS {rss // 1024} MB", ready and count == n and hz == 200,
            err or ("" if p.alive() else f"exited rc={p.rc} (OOM kills in its 8 GB cgroup: {oom_kills(cg) if cg else '?'}): {p.last_error()}") or ("" if ready else "not ready: " + p.last_error()))
        p.term()
        remove_cap(cg)
    finally:
        w.close()
