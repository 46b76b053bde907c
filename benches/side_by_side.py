"""Side by side on one tansu broker (issue 17): the passthrough ceiling, the Python peer
a platform team would write (benches/peer/stream_peer.py) and `twinguard run` with a
trained model, each draining the same backlog of simulated events in turn, then
response time at fixed loads, pinned to cores or not.

Backlog: N events of `twinguard simulate` (`wustl-flow-vitals/v1`, no malformed
records) in a 4-partition topic. Each contender gets its own consumer group and
output topic and drains all N; for each:
  - rate = N / (last output record's timestamp - first one's): the drain from its
    first answer on (start-up, model loading and the group join excluded);
  - whole = N / (process start -> every input offset committed).
Contenders run in rounds (passthrough, peer, twinguard per worker count, ...), so
machine noise spreads over all of them.

Response time (`--loads`): for each load a fresh input topic and a fresh pipeline;
once it is ready, `twinguard simulate --rate R` writes R events/s for --seconds; the
pipeline's own histograms (Prometheus /metrics) give event appended -> command
acknowledged by the broker (`twinguard_response_time_seconds`), the part of it after
the pipeline read the event (`twinguard_response_in_pipeline_seconds`) and event appended ->
verdict acknowledged (`twinguard_e2e_latency_seconds`, the oldest event of each
batch); quantiles interpolate within the histogram's buckets, and the share of
commands acknowledged within 50 ms is exact (50 ms is a bucket bound). `half`
stands for half the pinned (or unpinned) maximum measured in the backlog phase.

--pin: the broker and the load generator on CPU 0, every contender on CPU 1
(taskset); without it the scheduler places everything.

Usage: benches/side_by_side.sh [--events N] [--rounds R] [--workers 1,2] [--pin]
         [--loads 2000,5000,10000,half] [--seconds S] [--model DIR] [--out DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts", "campaign"))
from lib import TG, Tansu, Proc, log, free_port, wait_for, to_toml  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402

PARTS = 4
PEER = os.path.join(HERE, "peer", "stream_peer.py")


def cpu_prefix(cpu):
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def committed(bootstrap, group, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3, "enable.auto.commit": False})
    try:
        return sum(max(tp.offset, 0) for tp in c.committed([TopicPartition(topic, p) for p in range(PARTS)], timeout=10))
    finally:
        c.close()


def scan(bootstrap, topic):
    """Read a topic to its end: (records, smallest timestamp, largest timestamp), ms.
    Counted by reading, not from the high watermarks: tansu 0.6 (memory storage)
    answered stale ones right after a burst of writes."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "sbs-scan", "log_level": 3, "enable.auto.commit": False,
                  "enable.partition.eof": True})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTS)])
    n, first, last, eof = 0, None, None, set()
    try:
        while len(eof) < PARTS:
            msgs = c.consume(10000, 10.0)
            if not msgs:
                raise RuntimeError(f"reading {topic} stalled after {n} records")
            for m in msgs:
                if m.error():
                    eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                ts = m.timestamp()[1]
                n += 1
                first = ts if first is None else min(first, ts)
                last = ts if last is None else max(last, ts)
    finally:
        c.close()
    return n, first, last


class Bench:
    def __init__(self, a):
        self.a = a
        os.makedirs(a.out, exist_ok=True)
        broker_bin = os.environ.get("TANSU_BIN", "tansu")
        if a.pin:
            # The broker on CPU 0: a wrapper, since the campaign's Tansu starts the binary itself.
            wrapper = os.path.join(a.out, "tansu-pinned.sh")
            with open(wrapper, "w") as f:
                f.write(f"#!/bin/sh\nexec taskset -c 0 {broker_bin} \"$@\"\n")
            os.chmod(wrapper, 0o755)
            broker_bin = wrapper
        self.tansu = Tansu(a.out, binary=broker_bin).start()
        self.bs = self.tansu.bootstrap
        self.results = {"events": a.events, "pinned": a.pin, "rounds": [], "loads": []}

    def topics(self, prefix, compact=("changelog",)):
        names = ["input", "verdicts", "dlq", "changelog", "alerts", "commands", "acks", "feedback", "audit"]
        t = {n: f"{prefix}.{n}" for n in names}
        self.tansu.create_topics([(v, PARTS, k in compact) for k, v in t.items()])
        return t

    def simulate(self, topic, events, rate=None, seed=42):
        cfg = os.path.join(self.a.out, f"sim-{topic}.toml")
        with open(cfg, "w") as f:
            f.write(to_toml({"kafka": {"brokers": self.bs, "group_id": "sbs-sim"},
                             "topics": {"input": topic, "create": False, "partitions": PARTS}}))
        args = cpu_prefix(0 if self.a.pin else None) + [TG, "simulate", "--config", cfg, "--devices", str(self.a.devices),
                                                         "--events", str(events), "--seed", str(seed), "--malformed-rate", "0"]
        if rate:
            args += ["--rate", str(rate)]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.a.out, "simulate.log"), "ab"))

    def pipeline_cfg(self, t, group, port, workers):
        cfg = {"kafka": {"brokers": self.bs, "group_id": group, "consumer": {"fetch.wait.max.ms": "5"}},
               "topics": dict(t, create=False, partitions=PARTS),
               "model": {"path": self.a.model},
               "http": {"listen": f"127.0.0.1:{port}"}}
        if workers is not None:
            cfg["engine"] = {"workers": workers}
        path = os.path.join(self.a.out, f"{group}.toml")
        with open(path, "w") as f:
            f.write(to_toml(cfg))
        return path

    def start_twinguard(self, t, group, workers):
        port = free_port()
        cfg = self.pipeline_cfg(t, group, port, workers)
        # SBS_RUST_LOG, e.g. `warn,twinguard::obs::events::stream=debug`: each command's
        # event and acknowledgement times in the pipeline's log.
        p = Proc(self.a.out, group, ["run", "--config", cfg], http_port=port, log_level=os.environ.get("SBS_RUST_LOG", "warn"))
        if self.a.pin:
            # Proc starts the binary itself: pin every thread it has, and so every later one.
            subprocess.run(["taskset", "-a", "-p", "-c", "1", str(p.pid)], stdout=subprocess.DEVNULL, check=True)
        return p

    def drain(self, name, t, kind, workers=None):
        group = f"sbs-{name}"
        n = self.a.events
        started = time.time()
        if kind == "twinguard":
            proc = self.start_twinguard(t, group, workers)
            out_topic = t["verdicts"]
            alive = proc.alive
        else:
            args = cpu_prefix(1 if self.a.pin else None) + [sys.executable, PEER, kind, "--bootstrap", self.bs,
                                                               "--input", self.input, "--verdicts", t["verdicts"],
                                                               "--group", group, "--events", str(n)]
            if kind == "stream":
                args += ["--model", self.peer_model, "--dlq", t["dlq"]]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(os.path.join(self.a.out, f"{group}.log"), "ab"))
            out_topic = t["verdicts"]
            alive = lambda: proc.poll() is None  # noqa: E731
        ok = wait_for(f"{name} to drain {n} events", lambda: committed(self.bs, group, self.input) >= n or (not alive() and "dead"),
                      self.a.timeout, 0.5)
        whole = time.time() - started
        if ok is not True:
            raise RuntimeError(f"{name} did not drain the backlog ({ok}); see {self.a.out}/{group}.log")
        outputs, first, last = scan(self.bs, out_topic)
        dead = scan(self.bs, t["dlq"])[0]
        if kind == "twinguard":
            proc.term()
        else:
            proc.wait(60)
        rate = n / max((last - first) / 1000.0, 1e-3)
        row = {"contender": name, "outputs": outputs, "dead_letters": dead, "rate": round(rate), "whole_rate": round(n / whole), "whole_s": round(whole, 1)}
        log(f"{name}: {row}")
        return row

    def backlog(self):
        a = self.a
        self.input = "backlog.input"
        self.tansu.create_topics([(self.input, PARTS, False)])
        log(f"simulating {a.events} events into {self.input}")
        sim = self.simulate(self.input, a.events)
        if sim.wait() != 0:
            raise RuntimeError("twinguard simulate failed; see simulate.log")
        contenders = [("passthrough", "passthrough", None), ("peer", "stream", None)]
        contenders += [(f"twinguard-w{w}" if w else "twinguard", "twinguard", w) for w in a.workers]
        for r in range(a.rounds):
            rows = []
            for name, kind, w in contenders:
                t = self.topics(f"r{r}.{name}")
                t["input"] = self.input
                rows.append(self.drain(f"r{r}-{name}", t, kind, w))
            self.results["rounds"].append(rows)
            self.save()

    def load(self, rate, workers):
        a = self.a
        name = f"load{rate}-w{workers or 'default'}"
        t = self.topics(name)
        p = self.start_twinguard(t, f"sbs-{name}", workers)
        if wait_for(f"{name} ready", lambda: p.ready() or (not p.alive() and "dead"), 120, 0.2) is not True:
            raise RuntimeError(f"{name} did not become ready; see {a.out}/sbs-{name}.log")
        events = int(rate * a.seconds)
        sim = self.simulate(t["input"], events, rate=rate, seed=7)
        t0 = time.time()
        sim.wait()
        gen_s = time.time() - t0
        ok = wait_for(f"{name} verdicts", lambda: committed(self.bs, f"sbs-{name}", t["input"]) >= events, 120, 0.5)
        m = p.get("/metrics")[1].decode()
        p.term()
        row = {"load": rate, "workers": workers, "events": events, "generated_rate": round(events / gen_s),
               "all_answered": ok is True,
               "response": hist(m, "twinguard_response_time_seconds"),
               "response_in_pipeline": hist(m, "twinguard_response_in_pipeline_seconds"),
               "verdict": hist(m, "twinguard_e2e_latency_seconds")}
        log(f"{name}: {row}")
        self.results["loads"].append(row)
        self.save()

    def save(self):
        with open(os.path.join(self.a.out, "side_by_side.json"), "w") as f:
            json.dump(self.results, f, indent=1)


def hist(text, name):
    """Quantiles of a Prometheus histogram (linear within buckets) and the share <= 50 ms."""
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return {"count": 0}
    buckets.sort()
    total = buckets[-1][1]

    def q(x):
        want, prev_le, prev_c = x * total, 0.0, 0.0
        for le, c in buckets:
            if c >= want:
                if le == float("inf"):
                    return prev_le * 1000
                return 1000 * (prev_le + (le - prev_le) * (want - prev_c) / max(c - prev_c, 1e-9))
            prev_le, prev_c = le, c
        return None

    within = next((c for le, c in buckets if abs(le - 0.05) < 1e-9), None)
    return {"count": int(total), "p50_ms": round(q(0.5), 2), "p99_ms": round(q(0.99), 2),
            "share_within_50ms": round(within / total, 4) if within is not None else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="", help="twinguard worker counts to run, comma-separated")
    ap.add_argument("--pin", action="store_true", help="broker and generator on CPU 0, contenders on CPU 1")
    ap.add_argument("--loads", default="", help="response-time loads (events/s, or `half`), comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    ap.add_argument("--model", required=True, help="twinguard model directory")
    ap.add_argument("--peer-model", required=True, help="the peer's pickled forest")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a contender may take to drain")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    # An empty --workers runs the configuration's default (no `[engine]` section).
    a.workers = [int(w) for w in a.workers.split(",") if w] or [None]
    b = Bench(a)
    b.peer_model = a.peer_model
    try:
        if a.events > 0:
            b.backlog()
        for spec in [s for s in a.loads.split(",") if s]:
            for w in a.workers:
                if spec == "half":
                    best = max((r["rate"] for rs in b.results["rounds"] for r in rs if r["contender"].endswith(f"twinguard-w{w}" if w else "twinguard")), default=None)
                    if best is None:
                        raise SystemExit("--loads half needs the backlog phase (--events > 0)")
                    b.load(best // 2, w)
                else:
                    b.load(int(spec), w)
    finally:
        b.tansu.kill()
    print(json.dumps(b.results, indent=1))


if __name__ == "__main__":
    main()
