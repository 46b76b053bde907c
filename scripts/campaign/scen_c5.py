"""C5: hostile SQL and HTTP clients against a pipeline instance while its stream runs."""

import base64
import os
import random
import socket
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from lib import Pg, PgError, log, free_port, wait_for
from common import OPT, World, Run, row, size, simulate, Sampler
from scen_c6 import memory_cap, oom_kills, cg_peak_mb, remove_cap

USER, PASSWORD = "analyst", "campaign-Secret-1"


def salt_of(port, user):
    c = Pg(port, timeout=10)
    try:
        t0 = time.perf_counter()
        sf, _, _ = c.server_first(user)
        dt = time.perf_counter() - t0
        return dict(kv.split("=", 1) for kv in sf.split(","))["s"], dt
    finally:
        c.close()


def c5():
    sc = "C5"
    w = World("c5")
    cap_mb = 2048
    cg = memory_cap("c5", cap_mb)
    try:
        rate = size(200, 500)
        dur = size(240, 600)
        sim = simulate(w, 60, int(rate * dur), 21, rate=rate, malformed=0.01)
        sql_port = free_port()
        extra = {"sql": {"listen": f"127.0.0.1:{sql_port}", "users": [{"name": USER, "password": PASSWORD}],
                         "login_timeout_ms": 10000, "max_connections": 64, "query_timeout_ms": 30000}}
        f = Run(w, "fault", extra)
        p = f.start(cgroup=cg)
        if not f.wait_ready(p, 120):
            row(sc, "pipeline with SQL starts", "ready", "not ready", False, p.last_error())
            return
        smp = Sampler(lambda: p)
        smp.start()
        phases = []

        def phase(name):
            smp.phase = name
            phases.append((name, time.time()))
            log(f"C5 phase: {name}")

        deaths = []

        def ensure(where):
            """Restart the pipeline (same cap) if the last attack killed it; record the death."""
            nonlocal p
            if p.alive():
                return
            deaths.append((where, p.rc, oom_kills(cg) if cg else None))
            f.note_exit(p)
            p = f.start(cgroup=cg)
            f.wait_ready(p, 120)

        wait_for("the stream to flow", lambda: (p.metric_sum(p.metrics(), "twinguard_records_in_total") or 0) > 0, 60, 0.5)
        phase("baseline")
        time.sleep(size(5, 10))
        # 1. salt probing
        phase("salt probing")
        r = random.Random(OPT["seed"] + 5)
        names = ["".join(r.choice("abcdefghijklmnop") for _ in range(8)) for _ in range(100)]
        try:
            first = {n: salt_of(sql_port, n) for n in names}
            second = {n: salt_of(sql_port, n)[0] for n in names[:20]}
            known = [salt_of(sql_port, USER) for _ in range(20)]
            distinct = len(set(s for s, _ in first.values()))
            stable = all(second[n] == first[n][0] for n in second)
            t_unknown = statistics.mean(dt for _, dt in first.values()) * 1000
            t_known = statistics.mean(dt for _, dt in known) * 1000
            ok = distinct == len(names) and stable and known[0][0] not in set(s for s, _ in first.values())
            row(sc, "salt probing: SCRAM s= for 100 unknown names vs the real one", "100 distinct salts, each stable per name (unknown names indistinguishable)",
                f"{distinct} distinct, stable={stable}; server-first {t_unknown:.2f} ms unknown vs {t_known:.2f} ms known", ok,
                "" if ok else ("all unknown names share one decoy salt: names can be probed" if distinct == 1 else ""))
        except Exception as e:
            row(sc, "salt probing", "answers", "error", False, str(e))
        # 2. wrong passwords
        phase("wrong passwords")
        limit, secs = size(2000, 10000), size(20, 60)
        res = {"refused": 0, "ok": 0, "throttled": 0, "too many connections": 0}
        lock = threading.Lock()
        stop_at = time.time() + secs

        def brute(_):
            while time.time() < stop_at:
                with lock:
                    if sum(res.values()) >= limit:
                        return
                try:
                    c = Pg(sql_port, timeout=10)
                    try:
                        c.login(USER, "wrong-" + str(random.random()))
                        k = "ok"
                    finally:
                        c.close()
                except PgError as e:
                    msg = e.fields.get("M", "")
                    if e.code == "28P01" or (e.code == "28000" and "too many" not in msg):
                        k = "refused"          # the guess was checked
                    elif e.code == "28000":
                        k = "throttled"        # refused by the back-off, guess not checked
                    else:
                        k = "too many connections" if e.code == "53300" else "other " + e.code
                except Exception:
                    k = "other"
                with lock:
                    res[k] = res.get(k, 0) + 1
        t0 = time.time()
        with ThreadPoolExecutor(64) as ex:
            list(ex.map(brute, range(64)))
        el = time.time() - t0
        rate_ = res["refused"] / el
        m = p.metrics() or {}
        login_metric = sorted({k.split("{")[0] for k in m if "login" in k or "auth" in k})
        row(sc, f"{sum(res.values())} wrong passwords over 64 connections ({el:.0f} s)", "throttled: <= 20 guesses checked per second from one peer (the rest refused by a back-off), failures in a metric",
            f"{rate_:.1f} guesses checked/s ({res['refused']} checked, {res.get('throttled', 0)} refused by the back-off), {res['ok']} accepted, others {dict((k, v) for k, v in res.items() if k not in ('refused', 'ok', 'throttled') and v)}; login metrics {login_metric or 'none'}",
            rate_ <= 20 and res["ok"] == 0 and bool(login_metric), "no throttling of failed logins" if rate_ > 20 else ("no failed-login metric" if not login_metric else ""))
        # 3. connection flood
        ensure("before the flood")
        phase("connection flood")
        base_fds = p.fds() or 0
        secs = size(10, 30)
        stop_at = time.time() + secs
        cnt = {"opened": 0, "failed": 0}
        maxfd = [0]

        def flood(_):
            while time.time() < stop_at:
                try:
                    s = socket.create_connection(("127.0.0.1", sql_port), timeout=5)
                    s.sendall(struct.pack("!II", 8, 80877103))
                    s.close()
                    cnt["opened"] += 1
                except OSError:
                    cnt["failed"] += 1
                fd = p.fds() or 0
                maxfd[0] = max(maxfd[0], fd)
        held = []
        for _ in range(200):
            try:
                held.append(socket.create_connection(("127.0.0.1", sql_port), timeout=5))
            except OSError:
                break
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(flood, range(16)))
        fd_held = p.fds()
        for s in held:
            s.close()
        hz = [s.get("healthz") for s in smp.samples if s["phase"] == "connection flood"]
        top = max(maxfd[0], fd_held or 0)
        row(sc, f"connection flood: {cnt['opened'] / secs:.0f} conn/s for {secs} s + 200 held open", "alive, /healthz 200 throughout, fds <= baseline + max_connections (64) + 16 flood workers in flight + 64 refusals in progress (holding all 200 would exceed it)",
            f"alive={p.alive()}, /healthz {sorted(set(map(str, hz)))}, fds {base_fds} -> max {top}",
            p.alive() and set(hz) <= {200} and top <= base_fds + 64 + 16 + 64,
            "" if top <= base_fds + 64 + 16 + 64 else "the process held more descriptors than sql.max_connections (64) accounts for")
        # 4. slowloris, SQL and HTTP at once
        phase("slowloris")
        nconn = size(20, 100)
        watch = size(40, 60)

        def slow(port, payload, out, i):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=watch + 10)
            except OSError:
                out[i] = 0.0
                return
            t0 = time.time()
            s.settimeout(0.5)
            j = 0
            next_send = t0
            while time.time() - t0 < watch:
                if time.time() >= next_send and j < len(payload):
                    try:
                        s.send(payload[j:j + 1])
                    except OSError:
                        out[i] = time.time() - t0
                        return
                    j += 1
                    next_send += 5
                try:
                    d = s.recv(4096)
                    if not d:
                        out[i] = time.time() - t0
                        s.close()
                        return
                except socket.timeout:
                    pass
                except OSError:
                    out[i] = time.time() - t0
                    return
            out[i] = None
            s.close()
        startup = struct.pack("!I", 196608) + b"user\0" + USER.encode() + b"\0\0"
        startup = struct.pack("!I", len(startup) + 4) + startup
        http_req = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{p.http_port}\r\nX-Slow: 1\r\n\r\n".encode()
        sql_res, http_res = [None] * nconn, [None] * nconn
        ths = [threading.Thread(target=slow, args=(sql_port, startup, sql_res, i)) for i in range(nconn)]
        ths += [threading.Thread(target=slow, args=(p.http_port, http_req, http_res, i)) for i in range(nconn)]
        for t in ths:
            t.start()
        time.sleep(3)
        hz_during = p.get("/healthz")[0]
        for t in ths:
            t.join()
        sql_open = sum(1 for x in sql_res if x is None)
        sql_max = max((x for x in sql_res if x is not None), default=None)
        row(sc, f"slowloris on SQL: {nconn} pre-login connections, 1 byte / 5 s", "all closed by login_timeout_ms (10 s) + 3 s",
            f"{sql_open} still open after {watch} s; closed after <= {sql_max and round(sql_max, 1)} s", sql_open == 0 and (sql_max or 0) <= 13)
        http_open = sum(1 for x in http_res if x is None)
        http_max = max((x for x in http_res if x is not None), default=None)
        row(sc, f"slowloris on HTTP: {nconn} connections sending headers at 1 byte / 5 s", "all closed within 30 s (header timeout); /healthz answers meanwhile",
            f"{http_open} still open after {watch} s; closed after <= {http_max and round(http_max, 1)} s; /healthz during: {hz_during}",
            http_open == 0 and (http_max or 0) <= 30 and hz_during == 200, "no header read timeout on the HTTP endpoint" if http_open else "")
        # 5. memory bombs
        phase("memory bombs")
        bombs = {
            "nested replace x10": "select length(" + "replace(" * 10 + "'aaaaaaaaaa'" + ", 'a', 'aaaaaaaaaa')" * 10 + ")",
            "recursive CTE doubling s||s": "with recursive t(n, s) as (select 1, 'xxxxxxxx' union all select n + 1, s || s from t where n < 40) select max(length(s)) from t",
            "array_resize(make_array(1), 1e9)": "select cardinality(array_resize(make_array(1), 1000000000))",
            "string_agg over a 3-way self cross join": "select length(string_agg(a.device_id || b.device_id || c.device_id || cast(a.baselines as varchar), ',')) from twins a, twins b, twins c",
        }
        outcomes = {}
        rss0 = p.rss_kb() or 0

        def run_bomb(sql, proto="simple"):
            try:
                c = Pg(sql_port, timeout=90).login(USER, PASSWORD)
            except Exception as e:
                return f"login failed: {e}"
            try:
                rows = c.query(sql) if proto == "simple" else c.extended(sql)
                return f"ROWS {rows[:1]}"
            except PgError as e:
                return f"ERR {e.code}"
            except Exception as e:
                return f"conn: {type(e).__name__}"
            finally:
                c.close()
        killed_by = []
        for name, sql in bombs.items():
            ensure("before bomb " + name)
            before = oom_kills(cg) if cg else 0
            outcomes[name] = run_bomb(sql)
            time.sleep(1)
            if not p.alive():
                killed_by.append(f"{name} ({'OOM' if (oom_kills(cg) or 0) > before else 'rc=%s' % p.rc})")
                outcomes[name] += " -> pipeline killed"
        ensure("before 64 bombs at once")
        par = {}
        qs = list(bombs.values()) * 16
        before = oom_kills(cg) if cg else 0
        with ThreadPoolExecutor(64) as ex:
            par_res = list(ex.map(run_bomb, qs))
        for x in par_res:
            k = x.split(" ")[0] + (" " + x.split(" ")[1] if x.startswith("ERR") else "")
            par[k] = par.get(k, 0) + 1
        time.sleep(2)
        if not p.alive():
            killed_by.append(f"64 at once ({'OOM' if (oom_kills(cg) or 0) > before else 'rc=%s' % p.rc})")
        hz = p.get("/healthz")[0] if p.alive() else None
        row(sc, f"memory bombs one by one, then 64 at once (pipeline under a {cap_mb} MB cgroup cap, restarted after a kill)",
            "each refused or failing cleanly (an error); the pipeline survives, /healthz 200",
            f"{outcomes}; 64 at once: {par}; killed by: {killed_by or 'none'}; cgroup peak {cg_peak_mb(cg) if cg else '?'} MB (RSS before {rss0 // 1024} MB)",
            not killed_by and hz == 200 and all(o.startswith("ERR") for o in outcomes.values()),
            f"a read-only SQL user killed the pipeline: {', '.join(killed_by)}" if killed_by else "")
        ensure("after the memory bombs")
        # 6. read-only bypass, both protocols
        phase("read-only bypass")
        target = f"/tmp/twinguard-campaign-copy-{os.getpid()}.csv"
        attempts = {
            "CREATE EXTERNAL TABLE + select": ["CREATE EXTERNAL TABLE campaign_pw (line varchar) STORED AS CSV LOCATION '/etc/passwd'", "select * from campaign_pw limit 1"],
            "COPY (select 1) TO file": [f"COPY (select 1 as x) TO '{target}'"],
            "select * from '/etc/passwd'": ["select * from '/etc/passwd' limit 1"],
            "select * from file:// url": ["select * from 'file:///etc/passwd' limit 1"],
        }
        leaks = []
        for proto in ("simple", "extended"):
            for name, stmts in attempts.items():
                outs = []
                for s in stmts:
                    o = run_bomb(s, proto)
                    outs.append(o)
                    if o.startswith("ROWS"):
                        leaks.append(f"{proto} {name}: `{s[:40]}` -> {o[:60]}")
                outcomes[f"{proto}:{name}"] = outs
        file_made = os.path.exists(target)
        row(sc, "read-only bypass over simple and extended protocol (CREATE EXTERNAL TABLE, COPY TO, select from a path)", "all refused, no file written",
            f"{len(leaks)} accepted{': ' + '; '.join(leaks[:3]) if leaks else ''}; file written: {file_made}", not leaks and not file_made)
        if file_made:
            os.remove(target)
        # 7. huge Query message, many statements, prepared-statement flood
        ensure("before the huge messages")
        phase("huge messages")
        huge = size(64, 1024) * 1024 * 1024
        rss0 = p.rss_kb() or 0
        sent, closed = 0, False
        try:
            c = Pg(sql_port, timeout=30).login(USER, PASSWORD)
            c.s.sendall(b"Q" + struct.pack("!I", min(huge + 4, 2 ** 31 - 1)))
            chunk = b"a" * (1 << 20)
            while sent < huge:
                c.s.sendall(chunk)
                sent += len(chunk)
            c.s.sendall(b"\0")
            try:
                c._collect()
            except Exception:
                closed = True
            c.close()
        except Exception:
            closed = True
        peak = cg_peak_mb(cg) if cg else None
        row(sc, f"a {huge >> 20} MiB Query message after login", "refused or closed early; pipeline alive; RSS bounded",
            f"{sent >> 20} MiB accepted before {'close' if closed else 'completion'}; alive={p.alive()}; RSS {rss0 // 1024} -> {(p.rss_kb() or 0) // 1024} MB; cgroup peak {peak} MB",
            p.alive() and sent < huge, "the server read the whole message" if sent >= huge else "")
        if not p.alive():
            deaths.append(("huge Query message", p.rc, oom_kills(cg) if cg else None))
        ensure("after the huge Query message")
        n_stmts = size(100_000, 1_000_000)
        done_stmts, o = 0, "?"
        try:
            c = Pg(sql_port, timeout=30).login(USER, PASSWORD)
            c.s.settimeout(5)
            c.send(b"Q", b"select 1;" * n_stmts + b"\0")
            t_end = time.time() + 60
            o = "still answering after 60 s (closed)"
            while time.time() < t_end:
                try:
                    tag, body = c.recv_msg()
                except socket.timeout:
                    continue
                if tag == b"C":
                    done_stmts += 1
                elif tag == b"E":
                    o = f"ERR {Pg.err_fields(body).get('C')}"
                    break
                elif tag == b"Z":
                    o = "all answered"
                    break
            c.close()
        except Exception as e:
            o = f"{type(e).__name__}: {e}"
        def cpu_s():
            try:
                st = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
                return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                return 0.0
        c0 = cpu_s()
        time.sleep(10)
        busy = (cpu_s() - c0) / 10
        row(sc, f"{n_stmts} `select 1;` statements in one Query", "refused, or answered within 60 s; pipeline alive",
            f"{o}; {done_stmts} statements answered; alive={p.alive()}; pipeline CPU in the 10 s after the client closed: {busy:.0%}",
            p.alive() and (o == "all answered" or o.startswith("ERR")),
            "" if o == "all answered" or o.startswith("ERR") else "one Query message keeps the SQL endpoint busy past 60 s")
        ensure("after the many statements")
        n_prep = size(10_000, 100_000)
        rss0 = p.rss_kb() or 0
        try:
            c = Pg(sql_port, timeout=120).login(USER, PASSWORD)
            for i in range(n_prep):
                c.send(b"P", f"s{i}".encode() + b"\0select 1\0" + struct.pack("!H", 0))
                if i % 1000 == 999:
                    c.send(b"S", b"")
                    c._collect()
            c.send(b"S", b"")
            c._collect()
            o = "all parsed"
            c.close()
        except PgError as e:
            o = f"ERR {e.code}"
        except Exception as e:
            o = f"conn: {type(e).__name__}"
        grow = ((p.rss_kb() or 0) - rss0) // 1024
        row(sc, f"{n_prep} named prepared statements on one connection", "refused past a bound, or RSS growth < 256 MB; alive",
            f"{o}; RSS +{grow} MB; alive={p.alive()}", p.alive() and grow < 256)
        phase("end")
        time.sleep(3)
        smp.stop()
        # stream throughput and /healthz over every phase
        byphase = []
        for i, (name, t0) in enumerate(phases[:-1]):
            t1 = phases[i + 1][1]
            ss = [s for s in smp.samples if t0 <= s["t"] < t1 and s.get("records_in") is not None]
            ss = [s for s in ss if s.get("pid") == ss[-1].get("pid")] if ss else ss
            hzs = sorted(set(str(s.get("healthz")) for s in smp.samples if t0 <= s["t"] < t1))
            thr = round((ss[-1]["records_in"] - ss[0]["records_in"]) / max(0.1, ss[-1]["t"] - ss[0]["t"])) if len(ss) >= 2 else None
            byphase.append((name, thr, hzs))
        bad_hz = [b for b in byphase if b[2] and b[2] != ["200"]]
        row(sc, "stream throughput (records/s) and /healthz per phase", "/healthz 200 in every phase; the stream keeps flowing; the pipeline never dies",
            "; ".join(f"{n}: {'%s/s' % t if t is not None else 'n/a'} {h}" for n, t, h in byphase) + f"; deaths: {deaths or 'none'}",
            not bad_hz and all(t is None or t > 0 for _, t, _ in byphase) and not deaths,
            f"pipeline killed {len(deaths)} time(s): {deaths}" if deaths else "")
        sim.kill()
        if p.alive():
            f.term(p)
    finally:
        w.close()
        remove_cap(cg)
