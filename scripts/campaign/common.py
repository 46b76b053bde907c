"""Shared pieces of the scenarios: a scenario's world (one tansu), runs of the
pipeline over an input topic (chains of incarnations), the simulator, a schema-driven
event generator, the results table and the "nothing lost" comparison."""

import json
import os
import random
import signal
import subprocess
import threading
import time
import tomllib

from lib import (TG, Tansu, Tail, Outputs, Proc, log, free_port, wait_for, to_toml, deep_merge, read_input,
                 read_twins, read_values, make_audit_key, audit_verify, produce)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPT = {"quick": False, "out": None, "seed": 13}
RESULTS = []


def row(sc, check, expected, measured, ok, cause=""):
    RESULTS.append({"scenario": sc, "check": check, "expected": str(expected), "measured": str(measured),
                    "result": "PASS" if ok is True else ("FAIL" if ok is False else str(ok)), "cause": cause or ""})
    log(f"{sc} | {check} | expected {expected} | measured {measured} | {RESULTS[-1]['result']} {cause or ''}")


def Q():
    return OPT["quick"]


def size(quick, full):
    return quick if OPT["quick"] else full


# ------------------------------------------------------------------- world/run

class World:
    """One scenario's broker and input topic (and its audit key)."""

    def __init__(self, name, partitions=4, start=True, tansu=None):
        self.name = name
        self.dir = os.path.join(OPT["out"], name)
        os.makedirs(self.dir, exist_ok=True)
        self.n = partitions
        self.tansu = tansu or Tansu(self.dir)
        if start:
            self.tansu.start()
        self.input = f"{name}.input"
        if start:
            self.tansu.create_topics([(self.input, partitions, False)])
        self.key, self.pub = make_audit_key(self.dir)
        self.runs = []

    def close(self):
        for r in self.runs:
            r.close()
        self.tansu.kill()


OUT_TOPICS = ["verdicts", "dlq", "changelog", "alerts", "commands", "acks", "feedback", "audit"]


class Run:
    """The pipeline's outputs for one run over the world's input: its own output topics,
    and a chain of incarnations. A fresh incarnation joins a fresh group seeded with the
    previous group's committed offsets (tansu 0.6 keeps a SIGKILLed member in its group)."""

    def __init__(self, w, label, extra=None, audit=True, create=True):
        self.w, self.label = w, label
        self.prefix = f"{w.name}.{label}"
        self.topics = {k: f"{self.prefix}.{k}" for k in OUT_TOPICS}
        self.topics["input"] = w.input
        self.extra = extra or {}
        self.audit = audit
        if create:
            w.tansu.create_topics([(t, w.n, k == "changelog") for k, t in self.topics.items() if k != "input"])
        self.gen = 0
        self.group = None
        self.procs = []
        self.gaps = []       # (proc name, input-gap metric) per scrape
        self.exits = []      # (proc name, how, rc)
        self.cfg_path = None
        self.out = None
        w.runs.append(self)

    def follow(self):
        if self.out is None:
            self.out = Outputs(self.w.tansu.bootstrap, self.topics, self.w.n, self.w.input)
        return self.out

    def config(self, group, http_port, extra=None, name=None):
        t = dict(self.topics)
        cfg = {
            "kafka": {"brokers": self.w.tansu.bootstrap, "group_id": group,
                      "consumer": {"session.timeout.ms": "6000"}, "producer": {}},
            "topics": dict(t, create=True, partitions=self.w.n),
            "batch": {"max_records": 50, "max_linger_ms": 10},
            "http": {"listen": f"127.0.0.1:{http_port}"},
        }
        if self.audit:
            cfg["audit"] = {"signing_key_file": self.w.key}
        cfg = deep_merge(cfg, self.extra)
        if extra:
            cfg = deep_merge(cfg, extra)
        path = os.path.join(self.w.dir, f"{name or self.prefix + '-' + group}.toml")
        with open(path + ".tmp", "w") as f:
            f.write(to_toml(cfg))
        os.replace(path + ".tmp", path)
        self.cfg_path = path
        return path

    def start(self, fresh=True, extra=None, log_level="info", cgroup=None, env=None):
        if fresh or self.group is None:
            self.gen += 1
            new = f"{self.prefix}-g{self.gen}"
            if self.group is not None:
                self.w.tansu.copy_offsets(self.group, new, [(self.w.input, self.w.n), (self.topics["acks"], self.w.n)])
            self.group = new
        port = free_port()
        name = f"{self.prefix}-{len(self.procs) + 1}"
        path = self.config(self.group, port, extra, name=name)
        p = Proc(self.w.dir, name, ["run", "--config", path], http_port=port, cgroup=cgroup, log_level=log_level, env=env)
        self.procs.append(p)
        return p

    def scrape(self, p):
        m = p.metrics()
        if m is not None:
            self.gaps.append((p.name, p.metric_sum(m, "twinguard_input_gap_records_total")))
        return m

    def kill(self, p):
        self.scrape(p)
        rc = p.kill9()
        self.exits.append((p.name, "SIGKILL", rc))
        return rc

    def term(self, p):
        self.scrape(p)
        was_alive = p.alive()
        rc = p.term()
        self.exits.append((p.name, "SIGTERM" if was_alive else "exited by itself", rc))
        return rc

    def note_exit(self, p):
        """A process that exited by itself."""
        self.exits.append((p.name, "exited by itself", p.rc))

    def wait_ready(self, p, timeout=120):
        return wait_for(f"{p.name} ready", lambda: p.ready() or (not p.alive() and "dead"), timeout, 0.1) is True

    def wait_complete(self, total, timeout, procs=None, every=0.5):
        """Until the outputs cover `total` input coordinates (a set or a count)."""
        o = self.follow()
        deadline = time.time() + timeout
        while time.time() < deadline:
            o.poll(1.0)
            cov = o.covered()
            if isinstance(total, set):
                if total <= cov:
                    return True
            elif len(cov) >= total:
                return True
            if procs is not None and not any(p.alive() for p in procs):
                return False
            time.sleep(every)
        return False

    def quiesce(self, p, ticks=3, timeout=60):
        """After the input is answered: let `ticks` expiry ticks pass (their status lines),
        so idle-twin expiry has settled before the final state is compared."""
        after = len(p.log_text().splitlines())
        for _ in range(ticks):
            i = p.wait_log(["status", "twins="], timeout, after=after, every=0.1)
            if i is None:
                return False
            after = i + 1
        return True

    def close(self):
        for p in self.procs:
            if p.alive():
                p.kill9()
        if self.out:
            self.out.close()
            self.out = None


def input_total(w):
    return sum(hi for lo, hi in w.tansu.watermarks(w.input, w.n).values())


def simulate(w, devices, events, seed, rate=None, malformed=0.01, name="sim", extra_producer=None):
    """`twinguard simulate` into the world's input, one record per broker batch."""
    prod = {"batch.num.messages": "1", "linger.ms": "0"}
    prod.update(extra_producer or {})
    cfg = {"kafka": {"brokers": w.tansu.bootstrap, "group_id": f"{w.name}-sim", "producer": prod},
           "topics": {"input": w.input, "create": False, "partitions": w.n}}
    path = os.path.join(w.dir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(to_toml(cfg))
    args = [TG, "simulate", "--config", path, "--devices", str(devices), "--events", str(events), "--seed", str(seed),
            "--malformed-rate", str(malformed)]
    if rate:
        args += ["--rate", str(rate)]
    logf = open(os.path.join(w.dir, f"{name}.log"), "ab")
    return subprocess.Popen(args, stdout=logf, stderr=logf, env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))


class Sampler(threading.Thread):
    """Samples a process every second: RSS, /healthz, /readyz, records in, twins, fds."""

    def __init__(self, get_proc, every=1.0, metrics=True):
        super().__init__(daemon=True)
        self.get_proc, self.every, self.want_metrics = get_proc, every, metrics
        self.samples = []
        self.phase = ""
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            p = self.get_proc()
            s = {"t": time.time(), "phase": self.phase}
            if p is not None:
                s["pid"] = p.pid
                s["alive"] = p.alive()
                s["rss_kb"] = p.rss_kb()
                s["fds"] = p.fds()
                s["healthz"] = p.get("/healthz", timeout=2)[0]
                if self.want_metrics:
                    m = p.metrics()
                    if m:
                        s["records_in"] = p.metric_sum(m, "twinguard_records_in_total")
                        s["twins"] = p.metric_sum(m, "twinguard_twins")
                        s["twin_mem"] = p.metric_sum(m, "twinguard_twin_memory_bytes")
                        s["gap"] = p.metric_sum(m, "twinguard_input_gap_records_total")
            self.samples.append(s)
            self.halt.wait(self.every)

    def stop(self):
        self.halt.set()
        self.join(10)


# --------------------------------------------------------------- event generator

SCHEMA = tomllib.load(open(os.path.join(ROOT, "schemas/defs/wustl-flow-vitals.v1.toml"), "rb"))
DEVICE_TYPES = ["patient_monitor", "ecg_monitor", "pulse_oximeter", "infusion_pump", "ventilator"]


class EventGen:
    """Valid `wustl-flow-vitals/v1` events for `devices` devices, each device with its own
    event-time clock (start_ms, step_ms apart), values near a per-device baseline."""

    def __init__(self, devices, seed, start_ms, step_ms=1000, prefix="dev"):
        self.rng = random.Random(seed)
        r = self.rng
        self.ids = [f"{prefix}-{i:06d}" for i in range(devices)]
        self.clock = [start_ms + r.randrange(step_ms) for _ in range(devices)]
        self.step = step_ms
        self.static = []
        for i in range(devices):
            self.static.append({
                "device_type": DEVICE_TYPES[i % len(DEVICE_TYPES)],
                "src_addr": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                "src_mac": "02:00:%02x:%02x:%02x:%02x" % ((i >> 24) & 255, (i >> 16) & 255, (i >> 8) & 255, i & 255),
                "dst_addr": f"10.200.0.{1 + i % 3}",
                "dst_port": 443,
                "firmware_hash": "%064x" % (i * 7919 + 17),
            })
        self.metric_fields = [f for f in SCHEMA["fields"] if f.get("role") == "metric"]
        self.base = [{f["name"]: self._base(f) for f in self.metric_fields} for _ in range(devices)]

    def _base(self, f):
        lo, hi = f.get("min", 0.0), f.get("max", 1e6)
        return lo + (min(hi, lo + 1000.0) - lo) * self.rng.uniform(0.2, 0.8)

    def event(self, i, t_ms=None):
        """The next event of device i (advances its clock unless t_ms is given)."""
        if t_ms is None:
            self.clock[i] += self.step
            t_ms = self.clock[i]
        e = {"device_id": self.ids[i], "event_time": t_ms}
        e.update(self.static[i])
        r = self.rng
        for f in self.metric_fields:
            lo, hi = f.get("min", 0.0), f.get("max", 1e6)
            e[f["name"]] = round(min(hi, max(lo, self.base[i][f["name"]] * r.uniform(0.97, 1.03))), 3)
        return e


def enc(e):
    return json.dumps(e, separators=(",", ":")).encode()


# --------------------------------------------------------------- nothing lost

def strip_response(v):
    t = json.loads(v)
    t.pop("response", None)
    return t


def nothing_lost(sc, ref, fault, label=""):
    """The campaign's "nothing lost" definition, fault run against the reference run."""
    w = fault.w
    pre = f"{label}: " if label else ""
    inp = read_input(w.tansu.bootstrap, w.input, w.n)
    P = set(inp)
    ro, fo = ref.follow(), fault.follow()
    ro.to_end()
    fo.to_end()
    rv = ro.verdicts
    rd = {(p, o): c for (t, p, o), c in ro.dlq.items() if t == w.input}
    valid, invalid = set(rv) & P, set(rd) & P
    unclassified = P - valid - invalid
    both = valid & invalid
    ref_dups = sum(1 for c in rv.values() if any(x != c[0] for x in c))
    row(sc, pre + "reference run: every input coordinate has one verdict or one dead letter",
        f"{len(P)} coordinates", f"{len(valid)} valid + {len(invalid)} invalid, {len(unclassified)} unclassified, {len(both)} both, {ref_dups} non-identical ref copies",
        not unclassified and not both and ref_dups == 0, "" if not unclassified else f"reference incomplete: first {sorted(unclassified)[:5]}")
    fv = fo.verdicts
    missing = sorted(c for c in valid if c not in fv)
    differ = sorted(c for c in valid if c in fv and any(x != rv[c][0] for x in fv[c]))
    dups = sum(len(v) - 1 for v in fv.values())
    row(sc, pre + "every valid input coordinate has >= 1 verdict", len(valid), f"{len(valid) - len(missing)} ({dups} duplicate copies)",
        not missing, f"missing e.g. {missing[:5]}" if missing else "")
    cause = ""
    if differ:
        c = differ[0]
        cause = f"e.g. {c}: ref {rv[c][0][1][:160]!r} vs fault {[x[1][:160] for x in fv[c] if x != rv[c][0]][:1]}"
    row(sc, pre + "every verdict copy byte-identical to the reference's", "0 differing", f"{len(differ)} differing", not differ, cause)
    bad_dl = []
    for c in sorted(invalid):
        code, key, val, h = rd[c][0]
        orig = inp[c][1]
        copies = fo.dlq.get((w.input,) + c, [])
        good = any(cc == code and (v == orig or "twinguard.dlq.truncated" in hh) for cc, k, v, hh in copies)
        if not good:
            bad_dl.append((c, code, [cc for cc, *_ in copies]))
    row(sc, pre + "every invalid coordinate has a dead letter with the reference's code and the original bytes", len(invalid),
        len(invalid) - len(bad_dl), not bad_dl, f"e.g. {bad_dl[:3]}" if bad_dl else "")
    outside = [c for c in fv if c not in P] + [(p, o) for (t, p, o) in fo.dlq if t == w.input and (p, o) not in P]
    cross = [c for c in fv if c in invalid] + [(p, o) for (t, p, o) in fo.dlq if t == w.input and (p, o) in valid]
    row(sc, pre + "no output points outside the input (or at the other kind of coordinate)", 0, f"{len(outside)} outside, {len(cross)} crossed",
        not outside and not cross and fo.bad_verdicts == 0, f"e.g. {(outside + cross)[:5]}" if outside or cross else "")
    rt, _ = read_twins(w.tansu.bootstrap, ref.topics["changelog"], w.n)
    ft, _ = read_twins(w.tansu.bootstrap, fault.topics["changelog"], w.n)
    diffs = []
    for k in sorted(set(rt) | set(ft)):
        if k not in ft:
            diffs.append(f"{k}: missing")
        elif k not in rt:
            diffs.append(f"{k}: unexpected")
        elif rt[k] != ft[k] and strip_response(rt[k]) != strip_response(ft[k]):
            a, b = strip_response(rt[k]), strip_response(ft[k])
            keys = [x for x in sorted(set(a) | set(b)) if a.get(x) != b.get(x)]
            diffs.append(f"{k}: fields {keys[:6]} (events {a.get('events')} vs {b.get('events')})")
    row(sc, pre + "final twins (response state stripped) equal the reference's", f"{len(rt)} twins equal", f"{len(ft)} twins, {len(diffs)} differ",
        not diffs, "; ".join(diffs[:3]))

    def cmd_ids(run):
        ids = set()
        for v in read_values(w.tansu.bootstrap, run.topics["commands"], w.n):
            try:
                ids.add(json.loads(v)["command_id"])
            except Exception:
                ids.add(("unparseable", v[:40] if v else v))
        return ids
    rc_, fc_ = cmd_ids(ref), cmd_ids(fault)
    row(sc, pre + "same set of command ids", f"{len(rc_)} ids", f"{len(fc_)} ids, {len(rc_ - fc_)} missing, {len(fc_ - rc_)} extra",
        rc_ == fc_, f"missing {sorted(map(str, rc_ - fc_))[:3]} extra {sorted(map(str, fc_ - rc_))[:3]}" if rc_ != fc_ else "")
    if fault.audit:
        rc, out = audit_verify(fault.cfg_path, w.pub)
        row(sc, pre + "twinguard audit verify --public-key <pinned> passes", "exit 0", f"exit {rc}", rc == 0, "" if rc == 0 else out)
    gaps = [g for _, g in fault.gaps if g]
    row(sc, pre + "twinguard_input_gap_records_total is 0 in every scrape (before each kill/stop)", "0",
        f"{len(fault.gaps)} scrapes, max {max([g or 0 for _, g in fault.gaps] or [0]):.0f}", not gaps,
        f"nonzero in {[(n, g) for n, g in fault.gaps if g][:3]}" if gaps else "")
    odd = [(n, how, rc) for n, how, rc in fault.exits
           if not (rc == 0 or (how == "SIGKILL" and rc in (-9, 137)) or (how.startswith("fail-stop") and rc == 1))]
    row(sc, pre + "processes exit only by SIGKILL or with 0 (or 1 for an expected fail-stop)", "0 other exits", f"{len(fault.exits)} exits, {len(odd)} other",
        not odd, "; ".join(f"{n} {how} rc={rc}" for n, how, rc in odd[:3]))
    return {"valid": len(valid), "invalid": len(invalid), "dups": dups}


def finish_reference(sc, w, extra, total, timeout, audit=True, label="ref"):
    """The uninterrupted run over the same input and configuration."""
    ref = Run(w, label, extra, audit=audit)
    p = ref.start()
    ok = ref.wait_complete(total, timeout, [p])
    if not ok:
        log(f"{sc}: reference run incomplete: {len(ref.follow().covered())} of {total if isinstance(total, int) else len(total)}; {p.last_error()}")
    ref.quiesce(p)
    ref.term(p)
    return ref
