"""C3: one million records, 60 % malformed in every way, plus bad control records."""

import json
import random
import threading
import time

from lib import log, produce, Tail, read_all, hdrs
from common import OPT, World, Run, row, size, Sampler, EventGen, enc

NOW = lambda: int(time.time() * 1000)
FUTURE_MS = (23 * 3600 + 50 * 60) * 1000
STRING_FIELDS = ["src_addr", "src_mac", "dst_addr", "firmware_hash", "device_type"]


def rand_str(r, n):
    return "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(min(n, 64))) * (n // 64 + 1)


def nested(depth):
    return "[" * depth + "]" * depth


class BadGen:
    """Malformed records, every kind the decoder knows and the review lists."""

    def __init__(self, gen, r):
        self.g, self.r = gen, r
        self.kinds = [
            ("truncated", 6), ("byte_flips", 6), ("invalid_utf8_payload", 4), ("invalid_utf8_key", 3),
            ("type_swap", 8), ("num_1e309", 3), ("num_neg0", 2), ("num_1e-400", 2), ("num_2p63", 2), ("nan_literal", 3),
            ("infinity_literal", 2), ("duplicate_keys", 4), ("nest_127", 2), ("nest_129", 2), ("key_mismatch", 4),
            ("null_key", 2), ("empty_key", 2), ("empty_value", 2), ("null_value", 2), ("device_id_0", 2),
            ("device_id_128", 2), ("device_id_129", 2), ("device_id_ctrl", 2), ("time_i64_min", 2), ("time_i64_max", 2),
            ("time_negative", 2), ("time_leap_second", 2), ("time_1999", 2), ("not_object", 2), ("missing_field", 4),
            ("huge_string", 1), ("size_64k_minus_1", 1), ("size_64k", 1), ("size_64k_plus_1", 1), ("size_950k", 0.05)]
        self.total_w = sum(w for _, w in self.kinds)

    def pick(self):
        x = self.r.uniform(0, self.total_w)
        for k, wt in self.kinds:
            x -= wt
            if x <= 0:
                return k
        return self.kinds[0][0]

    def make(self, kind):
        g, r = self.g, self.r
        i = r.randrange(len(g.ids))
        e = g.event(i, g.clock[i])
        key = g.ids[i].encode()
        body = enc(e)
        if kind == "truncated":
            body = body[:r.randrange(1, len(body) - 1)]
        elif kind == "byte_flips":
            b = bytearray(body)
            for _ in range(r.randint(1, 5)):
                j = r.randrange(len(b))
                b[j] ^= 1 << r.randrange(8)
            body = bytes(b)
        elif kind == "invalid_utf8_payload":
            body = body.replace(b'"src_addr":"', b'"src_addr":"\xff\xfe\xc0', 1)
        elif kind == "invalid_utf8_key":
            key = b"\xff\xfe" + key
        elif kind == "type_swap":
            f = r.choice(list(e.keys()))
            e[f] = r.choice(["str", 12345, [1, 2], {"a": 1}, True, None, 1.5])
            body = enc(e)
        elif kind.startswith("num_") or kind in ("nan_literal", "infinity_literal"):
            lit = {"num_1e309": "1e309", "num_neg0": "-0", "num_1e-400": "1e-400", "num_2p63": "9223372036854775808",
                   "nan_literal": "NaN", "infinity_literal": "Infinity"}[kind]
            f = r.choice(["src_bytes", "rate", "dst_port", "spo2", "event_time"])
            e[f] = "@@"
            body = enc(e).replace(b'"@@"', lit.encode())
        elif kind == "duplicate_keys":
            body = body[:-1] + b',"device_id":"' + g.ids[(i + 1) % len(g.ids)].encode() + b'"}'
        elif kind in ("nest_127", "nest_129"):
            body = body[:-1] + b',"unknown":' + nested(127 if kind == "nest_127" else 129).encode() + b"}"
        elif kind == "key_mismatch":
            key = g.ids[(i + 1) % len(g.ids)].encode()
        elif kind == "null_key":
            key = None
        elif kind == "empty_key":
            key = b""
        elif kind == "empty_value":
            body = b""
        elif kind == "null_value":
            body = None
        elif kind.startswith("device_id_"):
            d = {"device_id_0": "", "device_id_128": "d" * 128, "device_id_129": "d" * 129, "device_id_ctrl": "dev\x00\x07\x1b[31m"}[kind]
            e["device_id"] = d
            key = d.encode()
            body = enc(e)
        elif kind.startswith("time_"):
            e["event_time"] = {"time_i64_min": -9223372036854775808, "time_i64_max": 9223372036854775807, "time_negative": -5000,
                               "time_leap_second": "2026-06-30T23:59:60Z", "time_1999": "1999-12-31T23:59:59Z"}[kind]
            body = enc(e)
        elif kind == "not_object":
            body = r.choice([b"[1,2,3]", b"42", b'"str"', b"null", b"true"])
        elif kind == "missing_field":
            e.pop(r.choice(["src_bytes", "device_id", "event_time", "rate"]))
            body = enc(e)
        elif kind == "huge_string":
            e[r.choice(STRING_FIELDS)] = rand_str(r, 60000)
            body = enc(e)
        elif kind.startswith("size_"):
            target = {"size_64k_minus_1": 65535, "size_64k": 65536, "size_64k_plus_1": 65537, "size_950k": 950 * 1024}[kind]
            e["padding"] = ""
            base = len(enc(e))
            e["padding"] = "p" * (target - base)
            body = enc(e)
        return key, body


def control_bombs(r, ids, n):
    """Bad ack and feedback records (n of each; a few with ~950 KB strings), as
    (key, value, kind)."""
    big = "x" * (950 * 1000)
    acks, fb = [], []
    for j in range(n):
        dev = r.choice(ids)
        k = j % 10
        if k == 0 and j < 300:
            a, kind = {"v": 1, "command_id": f"c-{j}", "device_id": dev, "status": big}, "950KB status (unknown variant)"
        elif k == 1 and j < 300:
            a, kind = {"v": 1, "command_id": big + str(j), "device_id": dev, "status": "applied"}, "950KB command_id"
        elif k == 2 and j < 300:
            a, kind = {"v": 1, "command_id": f"c-{j}", "device_id": big + str(j), "status": "applied"}, "950KB device_id"
        elif k == 3:
            a, kind = {"v": 1, "command_id": f"c-{j}", "device_id": dev, "status": "exploded"}, "unknown status"
        elif k == 4:
            a, kind = {"v": 2, "command_id": j, "device_id": [dev], "status": None}, "wrong types"
        elif k == 5:
            acks.append((dev.encode(), b'{"v":1,"command_id":"c-%d","device_id":"' % j + dev.encode() + b'","status":"app', "truncated"))
            continue
        elif k == 6:
            acks.append((dev.encode(), b"\xff\xfe not json \xc0 %d" % j, "invalid UTF-8"))
            continue
        elif k == 7:
            a, kind = {"v": 1, "command_id": f"c-{j}", "device_id": dev, "status": "applied", "reported": json.loads(nested(100))}, "deeply nested reported"
        elif k == 8:
            a, kind = {"v": 1, "command_id": f"c-{j}", "device_id": dev + "-other", "status": "applied"}, "device_id != key"
        else:
            a, kind = {"v": 1, "command_id": f"unknown-{j}", "device_id": dev, "status": "rejected", "reported": {"rate_limit": "x" * 2000}}, "unknown command id (well-formed)"
        acks.append((dev.encode(), json.dumps(a).encode(), kind))
    for j in range(n):
        k = j % 8
        if k == 0 and j < 240:
            f, kind = {"v": 1, "ref": f"alert-{j}", "label": big}, "950KB label"
        elif k == 1 and j < 240:
            f, kind = {"v": 1, "ref": big + str(j), "label": "false_positive"}, "950KB ref"
        elif k == 2:
            f, kind = {"v": 1, "ref": f"x:1:{j}", "label": "maybe"}, "unknown label"
        elif k == 3:
            fb.append((None, b'{"v":1,"ref":"a%d' % j, "truncated"))
            continue
        elif k == 4:
            fb.append((b"\xff", b"\xff\xfe\xfd %d" % j, "invalid UTF-8"))
            continue
        elif k == 5:
            f, kind = {"v": 1, "ref": j, "label": ["true_positive"]}, "wrong types"
        elif k == 6:
            f, kind = {"v": 3, "n": j}, "unknown version, fields missing"
        else:
            f, kind = {"v": 1, "ref": f"topic:notanumber:{j}", "label": "true_positive", "extra": "y" * 5000}, "malformed ref + unknown field"
        fb.append((b"analyst", json.dumps(f).encode(), kind))
    return acks, fb


def c3():
    sc = "C3"
    total = size(100_000, 1_000_000)
    n_control = size(400, 1000)
    r = random.Random(OPT["seed"] + 3)
    w = World("c3")
    try:
        # Valid events from 1000 devices dated from 3 h ago, so a future-dated event (now +
        # 23 h 50 m) would put every twin past a 24 h idle TTL if it moved the watermark.
        devices = size(300, 1000)
        g = EventGen(devices, OPT["seed"], NOW() - 3 * 3600_000, step_ms=10, prefix="c3")
        bad = BadGen(g, r)
        hog = EventGen(20, 99, NOW() - 3 * 3600_000, step_ms=10, prefix="c3-hog")
        extra = {"batch": {"max_records": 1000, "expiry_interval_secs": 2},
                 "state": {"idle_ttl_secs": 90000}, "decode": {"max_future_secs": 86400}}
        f = Run(w, "fault", extra, audit=True)
        p = f.start(log_level="warn,twinguard::obs::events=error")
        cur = [p]
        f.wait_ready(p, 120)
        smp = Sampler(lambda: cur[0])
        smp.start()
        kinds = {}
        marks = {}
        prod = w.tansu.producer(**{"linger.ms": 50, "batch.size": 1000000})
        errs = []
        acked = set()
        ctrl_sent = {}   # (topic, partition, offset) -> kind
        pending_kind = {}

        def kind_of(msg):
            return pending_kind.get((msg.topic(), msg.key(), len(msg.value() or b""), (msg.value() or b"")[:64], (msg.value() or b"")[-64:]), "?")

        def cb(err, msg):
            if err is not None:
                errs.append(str(err))
            elif msg.topic() == w.input:
                acked.add(msg.partition() << 40 | msg.offset())
            else:
                ctrl_sent[(msg.topic(), msg.partition(), msg.offset())] = kind_of(msg)
        hog_at = set(int(total * (0.2 + 0.2 * j / 1200)) for j in range(1200))
        fut_at = set(range(total // 2, total // 2 + 10))
        ctrl_at = int(total * 0.7)
        t0 = time.time()
        for i in range(total):
            if i in hog_at:
                j = r.randrange(20)
                e = hog.event(j)
                e[r.choice(STRING_FIELDS)] = rand_str(r, 60000)
                k, v, kind = hog.ids[j].encode(), enc(e), "hog_huge_strings"
            elif i in fut_at:
                j = r.randrange(devices)
                e = g.event(j, NOW() + FUTURE_MS)
                k, v, kind = g.ids[j].encode(), enc(e), "future_dated_23h50m"
                marks.setdefault("future_sent", time.time())
            elif r.random() < 0.4:
                j = r.randrange(devices)
                k, v, kind = g.ids[j].encode(), enc(g.event(j)), "valid"
            else:
                kind = bad.pick()
                k, v = bad.make(kind)
            kinds[kind] = kinds.get(kind, 0) + 1
            while True:
                try:
                    prod.produce(w.input, key=k, value=v, on_delivery=cb)
                    break
                except BufferError:
                    prod.poll(0.05)
            if i % 1000 == 0:
                prod.poll(0)
            if i == ctrl_at:
                acks, fb = control_bombs(r, g.ids, n_control)
                for t, recs in ((f.topics["acks"], acks), (f.topics["feedback"], fb)):
                    for kk, vv, kind in recs:
                        pending_kind[(t, kk, len(vv), vv[:64], vv[-64:])] = t.rsplit(".", 1)[1] + ": " + kind
                        prod.produce(t, key=kk, value=vv, on_delivery=cb)
                marks["control_sent"] = time.time()
        prod.flush(600)
        t_prod = time.time() - t0
        log(f"C3: produced {total} input records in {t_prod:.0f}s ({len(errs)} refused by the broker), kinds {kinds}")
        # Follow the outputs: coordinates (as ints), sizes.
        n_parts = w.n
        cov, dup = set(), [0]
        big = {}
        ctrl_dl = [0]
        ctrl_seen = set()

        def note_size(t, m):
            s = len(m.value() or b"") + len(m.key() or b"")
            big[t] = max(big.get(t, 0), s)

        def on_v(m):
            note_size("verdicts", m)
            try:
                v = json.loads(m.value())
                c = v["source"]["partition"] << 40 | v["source"]["offset"]
            except Exception:
                return
            if c in cov:
                dup[0] += 1
            cov.add(c)

        def on_d(m):
            note_size("dlq", m)
            h = hdrs(m)
            if h.get("twinguard.dlq.topic") == w.input:
                c = int(h["twinguard.dlq.partition"]) << 40 | int(h["twinguard.dlq.offset"])
                if c in cov:
                    dup[0] += 1
                cov.add(c)
            else:
                ctrl_dl[0] += 1
                try:
                    ctrl_seen.add((h.get("twinguard.dlq.topic"), int(h["twinguard.dlq.partition"]), int(h["twinguard.dlq.offset"])))
                except Exception:
                    pass

        tails = [Tail(w.tansu.bootstrap, f.topics["verdicts"], n_parts, on_v), Tail(w.tansu.bootstrap, f.topics["dlq"], n_parts, on_d)]
        in_total = len(acked)
        exits = []
        last_ctrl = (0, time.time())
        deadline = time.time() + size(300, 1200)
        restarts = 0
        while time.time() < deadline:
            for t in tails:
                t.poll(2.0)
            if ctrl_dl[0] != last_ctrl[0]:
                last_ctrl = (ctrl_dl[0], time.time())
            if acked <= cov and (len(ctrl_seen) >= len(ctrl_sent) or time.time() - last_ctrl[1] > 30):
                break
            if not p.alive():
                exits.append((p.name, p.rc, p.last_error()))
                f.note_exit(p)
                if restarts >= 2:
                    break
                restarts += 1
                p = f.start(log_level="warn,twinguard::obs::events=error")
                cur[0] = p
                f.wait_ready(p, 120)
        for t in tails:
            try:
                t.to_end(120)
            except Exception as e:
                log(f"C3: {e}")
        smp.stop()
        alive_end = p.alive()
        row(sc, f"{total} records ({kinds.get('valid', 0)} valid, rest malformed in {len(kinds) - 1} ways) + {2 * n_control} bad control records",
            "no exit", "no exit" if not exits else f"{len(exits)} exits ({restarts} restarts)", not exits,
            "; ".join(f"{n} rc={rc}: {e}" for n, rc, e in exits[:2]))
        missing, outside = len(acked - cov), len(cov - acked)
        row(sc, "verdicts + dead letters = distinct input coordinates", f"{in_total} acknowledged coordinates", f"{len(cov)} distinct ({dup[0]} duplicates), {missing} without output, {outside} outside",
            not missing and not outside, f"{missing} input records without output" if missing else "")
        unanswered, wellformed = {}, [0, 0]
        for c, kind in ctrl_sent.items():
            if "(well-formed)" in kind:
                wellformed[0] += 1
                wellformed[1] += c in ctrl_seen
            elif c not in ctrl_seen:
                unanswered[kind] = unanswered.get(kind, 0) + 1
        bad = sum(1 for k in ctrl_sent.values() if "(well-formed)" not in k)
        row(sc, "every malformed control record (acks, feedback) has a dead letter at its coordinates", bad,
            f"{bad - sum(unanswered.values())}; without one: {unanswered or 'none'} (well-formed acks of unknown commands: {wellformed[1]} of {wellformed[0]} dead-lettered, not required)",
            not unanswered, "")
        from lib import read_twins
        twins, cl_big = read_twins(w.tansu.bootstrap, f.topics["changelog"], w.n)
        big["changelog"] = cl_big
        for t in ("alerts", "commands", "audit"):
            read_all(w.tansu.bootstrap, f.topics[t], w.n, lambda m, t=t: note_size(t, m))
        over = {t: s for t, s in big.items() if s >= 1_000_000}
        row(sc, "every output record < 1,000,000 bytes", "< 1000000", ", ".join(f"{t} max {s}" for t, s in sorted(big.items())), not over)
        largest = max((len(v) for v in twins.values()), default=0)
        last = [s for s in smp.samples if s.get("twins")]
        per = (last[-1]["twin_mem"] / last[-1]["twins"]) if last else None
        row(sc, "twin size bounded", "largest changelog twin <= 64 KiB; twin_memory_bytes/twins <= 4 KiB",
            f"largest {largest} B; {per and round(per)} B/twin over {last[-1]['twins'] if last else '?'} twins", largest <= 65536 and per is not None and per <= 4096)
        rss = [(s["t"], s["rss_kb"]) for s in smp.samples if s.get("rss_kb")]
        if len(rss) >= 8:
            n = len(rss)
            mid = max(x for _, x in rss[n // 4: n // 2])
            end = max(x for _, x in rss[3 * n // 4:])
            ok = end <= 1.25 * mid + 64 * 1024
            row(sc, "RSS plateaus", "max RSS of the last quarter <= 1.25 x that of the second quarter (+64 MB)",
                f"{mid // 1024} MB -> {end // 1024} MB (peak {max(x for _, x in rss) // 1024} MB)", ok)
        else:
            row(sc, "RSS plateaus", "sampled", f"{len(rss)} samples", False, "too few samples (process gone?)")
        before = [s["twins"] for s in smp.samples if s.get("twins") and s.get("records_in", 0) < 0.45 * total]
        after = [s["twins"] for s in smp.samples if s.get("twins") is not None and s.get("records_in", 0) > 0.55 * total]
        if before and after:
            b, a = max(before), min(after)
            row(sc, "twin count does not drop after a future-dated event (now + 23 h 50 m)", f">= {int(0.95 * b)} (95 % of {int(b)})",
                f"min after: {int(a)}", a >= 0.95 * b, "" if a >= 0.95 * b else "one device's event-time claim expired other devices' twins (watermark poisoning)")
        else:
            row(sc, "twin count does not drop after a future-dated event (now + 23 h 50 m)", "twin counts sampled before and after",
                f"{len(before)} before / {len(after)} after samples", False, "no samples on one side (process gone?)")
        for t in tails:
            t.close()
        if alive_end:
            f.term(p)
    finally:
        w.close()
