"""Campaign infrastructure: tansu and twinguard processes, topic readers, the
"nothing lost" comparison with a fault-free reference run, a Postgres-wire client.

Everything waits for a condition with a deadline; sleeps are only the faults' own
durations (a pause, a kill delay) and polling intervals.
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict

from confluent_kafka import Consumer, Producer, TopicPartition, KafkaException, OFFSET_BEGINNING
from confluent_kafka.admin import AdminClient, NewTopic

TG = os.environ.get("TWINGUARD_BIN", "twinguard")
TANSU = os.environ.get("TANSU_BIN", "tansu")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


_ports_given = set()


def free_port():
    """A free port below the kernel's ephemeral range (so an outgoing connection cannot
    take it between this check and the listener's bind), not handed out before."""
    try:
        lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except OSError:
        lo = 32768
    while True:
        p = random.randrange(20000, max(20001, lo - 1))
        if p in _ports_given:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            s.close()
        _ports_given.add(p)
        return p


def wait_for(what, cond, timeout, every=0.2):
    """Poll cond() until truthy (returned) or timeout (returns None)."""
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > deadline:
            log(f"timed out after {timeout:.0f}s waiting for {what}")
            return None
        time.sleep(every)


# --------------------------------------------------------------------------- tansu

class Tansu:
    """A tansu 0.6 broker on 127.0.0.1 (memory storage unless told otherwise)."""

    def __init__(self, dir, port=None, binary=None, storage="memory://tansu/"):
        self.dir = dir
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.binary = binary or TANSU
        self.storage = storage
        self.proc = None
        self.starts = 0

    def start(self, wait=True):
        url = f"tcp://127.0.0.1:{self.port}"
        self.starts += 1
        f = open(os.path.join(self.dir, f"tansu-{self.starts}.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("TANSU_LOG", "warn"))
        self.proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", self.storage],
            stdout=f, stderr=f, env=env)
        if wait:
            ok = wait_for("tansu to answer", self.answers, 60, 0.2)
            if not ok:
                raise RuntimeError(f"tansu did not answer on {self.bootstrap}")
        return self

    def answers(self):
        try:
            AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(timeout=2)
            return True
        except Exception:
            return False

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait()

    def admin(self):
        return AdminClient({"bootstrap.servers": self.bootstrap})

    def create_topics(self, specs):
        """specs: [(name, partitions, compact)]"""
        new = [NewTopic(n, num_partitions=p, replication_factor=1, config={"cleanup.policy": "compact"} if c else {}) for n, p, c in specs]
        admin = self.admin()
        futs = admin.create_topics(new, operation_timeout=30)
        for n, f in futs.items():
            try:
                f.result(60)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise

    def producer(self, **extra):
        conf = {"bootstrap.servers": self.bootstrap, "log_level": 3, "enable.idempotence": True, "acks": "all", "linger.ms": 20,
                "message.max.bytes": 1048576, "queue.buffering.max.messages": 2000000, "queue.buffering.max.kbytes": 2097151}
        conf.update(extra)
        return Producer(conf)

    def watermarks(self, topic, n):
        c = Consumer({"bootstrap.servers": self.bootstrap, "log_level": 3, "group.id": "campaign-wm", "enable.auto.commit": False})
        try:
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in range(n)}
        finally:
            c.close()

    def committed(self, group, topic, n):
        c = Consumer({"bootstrap.servers": self.bootstrap, "log_level": 3, "group.id": group, "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(topic, p) for p in range(n)], timeout=10)
            return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
        finally:
            c.close()

    def copy_offsets(self, src, dst, topics_n):
        """Commit for group `dst` what group `src` committed (tansu 0.6 keeps a SIGKILLed
        member in its group, so a restart joins a fresh group at the same offsets)."""
        keep = []
        for topic, n in topics_n:
            for p, o in self.committed(src, topic, n).items():
                keep.append(TopicPartition(topic, p, o))
        if keep:
            c = Consumer({"bootstrap.servers": self.bootstrap, "log_level": 3, "group.id": dst, "enable.auto.commit": False})
            try:
                c.commit(offsets=keep, asynchronous=False)
            finally:
                c.close()
        return len(keep)


def produce(producer, topic, records, partition=None, on_progress=None):
    """records: iterable of (key bytes|None, value bytes|None). Returns [(p, o)] in order
    (None for a record the broker refused)."""
    coords = []
    errors = []

    def cb_for(i):
        def cb(err, msg):
            if err is None:
                coords[i] = (msg.partition(), msg.offset())
            else:
                errors.append(str(err))
        return cb

    for i, (k, v) in enumerate(records):
        coords.append(None)
        kw = {"key": k, "value": v, "on_delivery": cb_for(i)}
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kw)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if on_progress and i % 10000 == 0:
            on_progress(i)
    producer.flush(300)
    return coords, errors


# ------------------------------------------------------------------ topic reading

class Tail:
    """Reads every partition of a topic from the beginning, incrementally. `handle(msg)`
    is called per record. tansu 0.6 was seen to serve nothing from an offset below the
    high watermark forever (after a SIGKILLed producer): such a partition is stepped
    past one offset after 20 s, loudly (a record really there then counts as missing)."""

    def __init__(self, bootstrap, topic, n, handle):
        self.topic, self.n, self.handle = topic, n, handle
        self.c = Consumer({"bootstrap.servers": bootstrap, "log_level": 3, "group.id": f"campaign-reader-{random.random()}",
                           "enable.auto.commit": False, "fetch.message.max.bytes": 2097152,
                           "receive.message.max.bytes": 104857600, "enable.partition.eof": False})
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
        self.next = {p: 0 for p in range(n)}
        self.moved = {p: time.time() for p in range(n)}
        self.stepped = []
        self.count = 0

    def poll(self, max_secs=1.0):
        deadline = time.time() + max_secs
        got = 0
        while time.time() < deadline:
            msgs = self.c.consume(num_messages=10000, timeout=0.2)
            if not msgs:
                break
            for m in msgs:
                if m.error():
                    continue
                self.handle(m)
                self.count += 1
                got += 1
                if m.offset() + 1 > self.next[m.partition()]:
                    self.next[m.partition()] = m.offset() + 1
                    self.moved[m.partition()] = time.time()
        return got

    def ends(self):
        return {p: self.c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1] for p in range(self.n)}

    def to_end(self, timeout=120):
        """Read until every partition is at its high watermark AND two polls in a row
        return nothing: tansu 0.6 reports a partition's high watermark as the base offset
        of its last batch + 1 (measured: 9,600 records in batches, high watermark 1), so
        the watermark alone would stop inside the last batch."""
        ends = self.ends()
        deadline = time.time() + timeout
        idle = 0
        while any(self.next[p] < ends[p] for p in ends) or idle < 2:
            if time.time() > deadline:
                raise RuntimeError(f"reading {self.topic} to its end timed out: at {self.next}, ends {ends}")
            if self.poll(0.5):
                idle = 0
                continue
            idle += 1
            for p in ends:
                if self.next[p] < ends[p] and time.time() - self.moved[p] > 20:
                    log(f"reader: broker served nothing of {self.topic}[{p}] at offset {self.next[p]} (end {ends[p]}) for 20 s: stepping past it")
                    self.stepped.append((p, self.next[p]))
                    self.c.seek(TopicPartition(self.topic, p, self.next[p] + 1))
                    self.next[p] += 1
                    self.moved[p] = time.time()
        return self

    def close(self):
        self.c.close()


def read_all(bootstrap, topic, n, handle, timeout=300):
    t = Tail(bootstrap, topic, n, handle)
    try:
        t.to_end(timeout)
        return t
    finally:
        t.close()


def hdrs(m):
    return {k: (v.decode("utf-8", "replace") if v is not None else None) for k, v in (m.headers() or [])}


class Outputs:
    """A run's verdicts and dead letters, followed incrementally: coordinate -> copies."""

    def __init__(self, bootstrap, topics, n, input_topic):
        self.input_topic = input_topic
        self.verdicts = defaultdict(list)   # (p, o) -> [(key, value)]
        self.dlq = defaultdict(list)        # (topic, p, o) -> [(code, key, value, headers)]
        self.bad_verdicts = 0
        self.max_bytes = {}

        def on_verdict(m):
            self._size("verdicts", m)
            try:
                v = json.loads(m.value())
                c = (v["source"]["partition"], v["source"]["offset"])
            except Exception:
                self.bad_verdicts += 1
                return
            self.verdicts[c].append((m.key(), m.value()))

        def on_dlq(m):
            self._size("dlq", m)
            h = hdrs(m)
            try:
                c = (h.get("twinguard.dlq.topic"), int(h.get("twinguard.dlq.partition")), int(h.get("twinguard.dlq.offset")))
            except Exception:
                c = (None, -1, -1)
            self.dlq[c].append((h.get("twinguard.dlq.code"), m.key(), m.value(), h))

        self.tails = [Tail(bootstrap, topics["verdicts"], n, on_verdict), Tail(bootstrap, topics["dlq"], n, on_dlq)]

    def _size(self, what, m):
        s = len(m.value() or b"") + len(m.key() or b"")
        if s > self.max_bytes.get(what, 0):
            self.max_bytes[what] = s

    def poll(self, secs=0.5):
        return sum(t.poll(secs) for t in self.tails)

    def to_end(self):
        for t in self.tails:
            t.to_end()

    def covered(self):
        """Input coordinates with a verdict or a dead letter."""
        s = set(self.verdicts.keys())
        s.update((p, o) for (t, p, o) in self.dlq.keys() if t == self.input_topic)
        return s

    def close(self):
        for t in self.tails:
            t.close()


def read_input(bootstrap, topic, n):
    recs = {}

    def h(m):
        recs[(m.partition(), m.offset())] = (m.key(), m.value())
    read_all(bootstrap, topic, n, h)
    return recs


def read_twins(bootstrap, topic, n):
    """Final changelog value per key (a tombstone removes), and the largest record."""
    twins = {}
    big = [0]

    def h(m):
        k = m.key().decode("utf-8", "replace") if m.key() else ""
        v = m.value()
        big[0] = max(big[0], len(v or b"") + len(m.key() or b""))
        if v is None:
            twins.pop(k, None)
        else:
            twins[k] = v
    read_all(bootstrap, topic, n, h)
    return twins, big[0]


def read_values(bootstrap, topic, n):
    vals = []
    read_all(bootstrap, topic, n, lambda m: vals.append(m.value()))
    return vals


# ------------------------------------------------------------- twinguard process

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(d, prefix=""):
    lines, tables, arrays = [], [], []
    for k, v in d.items():
        key = json.dumps(k) if re.search(r"[^A-Za-z0-9_-]", k) else k
        if isinstance(v, dict):
            tables.append((key, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((key, v))
        elif v is not None:
            lines.append(f"{key} = {toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, v in tables:
        name = f"{prefix}{key}"
        out += f"\n[{name}]\n" + to_toml(v, name + ".")
    for key, arr in arrays:
        name = f"{prefix}{key}"
        for item in arr:
            out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def deep_merge(a, b):
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class Proc:
    """A `twinguard` process (run, sql) with its log and HTTP endpoint."""

    def __init__(self, dir, name, args, http_port=None, env=None, cgroup=None, log_level="info"):
        self.name = name
        self.log = os.path.join(dir, f"{name}.log")
        self.http_port = http_port
        f = open(self.log, "ab")
        e = dict(os.environ, RUST_LOG=log_level, NO_COLOR="1")
        e.update(env or {})
        pre = None
        if cgroup:
            def pre():
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                    fh.write(str(os.getpid()))
        self.started = time.time()
        self.proc = subprocess.Popen([TG] + args, stdout=f, stderr=f, env=e, preexec_fn=pre)
        self.pid = self.proc.pid
        self.rc = None
        self.how = None  # "kill9" | "term" | None

    def alive(self):
        if self.rc is None:
            r = self.proc.poll()
            if r is not None:
                self.rc = r
        return self.rc is None

    def get(self, path, timeout=3):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            c.close()
            return r.status, body
        except Exception as e:
            return None, str(e).encode()

    def ready(self):
        return self.get("/readyz")[0] == 200

    def metrics(self):
        st, body = self.get("/metrics", timeout=5)
        if st != 200:
            return None
        m = {}
        for line in body.decode("utf-8", "replace").splitlines():
            if not line or line.startswith("#"):
                continue
            try:
                name, val = line.rsplit(" ", 1)
                m[name] = float(val)
            except ValueError:
                pass
        return m

    def metric_sum(self, m, base):
        if m is None:
            return None
        return sum(v for k, v in m.items() if k == base or k.startswith(base + "{"))

    def rss_kb(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def log_text(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_lines(self, *needles):
        return [l for l in self.log_text().splitlines() if all(n in l for n in needles)]

    def wait_log(self, needles, timeout, after=0, every=0.01):
        """Wait for a log line (among lines[after:]) containing every needle; returns its index."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            lines = self.log_text().splitlines()
            for i in range(after, len(lines)):
                if all(n in lines[i] for n in needles):
                    return i
            if not self.alive():
                return None
            time.sleep(every)
        return None

    def kill9(self):
        self.how = "kill9"
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.rc = self.proc.wait()
        return self.rc

    def term(self, wait=180):
        self.how = "term"
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.rc = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.rc = self.proc.wait()
            self.how = "term-timeout"
        return self.rc

    def last_error(self):
        lines = [l for l in self.log_text().splitlines() if " ERROR " in l or "panicked" in l or "Error:" in l or "error:" in l]
        return (lines[-1] if lines else (self.log_text().splitlines() or [""])[-1])[-400:]


# ------------------------------------------------------------ ed25519 public key

def ed25519_public(seed):
    """The RFC 8032 public key of a 32-byte ed25519 seed (reference arithmetic; the
    campaign pins it for `audit verify --public-key`, never deriving it in the tool)."""
    p = 2 ** 255 - 19
    d = -121665 * pow(121666, p - 2, p) % p

    def inv(x):
        return pow(x, p - 2, p)

    def recover_x(y, sign):
        x2 = (y * y - 1) * inv(d * y * y + 1) % p
        x = pow(x2, (p + 3) // 8, p)
        if (x * x - x2) % p != 0:
            x = x * pow(2, (p - 1) // 4, p) % p
        if x & 1 != sign:
            x = p - x
        return x

    gy = 4 * inv(5) % p
    gx = recover_x(gy, 0)
    G = (gx, gy, 1, gx * gy % p)

    def add(P, Q):
        A = (P[1] - P[0]) * (Q[1] - Q[0]) % p
        B = (P[1] + P[0]) * (Q[1] + Q[0]) % p
        C = 2 * P[3] * Q[3] * d % p
        D = 2 * P[2] * Q[2] % p
        E, F, G2, H = B - A, D - C, D + C, B + A
        return (E * F % p, G2 * H % p, F * G2 % p, E * H % p)

    def mul(s, P):
        Q = (0, 1, 1, 0)
        while s > 0:
            if s & 1:
                Q = add(Q, P)
            P = add(P, P)
            s >>= 1
        return Q

    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    A = mul(a, G)
    zi = inv(A[2])
    x, y = A[0] * zi % p, A[1] * zi % p
    return (y | ((x & 1) << 255)).to_bytes(32, "little").hex()


def make_audit_key(dir):
    path = os.path.join(dir, "audit.key")
    if os.path.exists(path):
        os.remove(path)
    r = subprocess.run([TG, "audit", "keygen", "--out", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"audit keygen failed: {r.stderr}")
    seed = bytes.fromhex(open(path).read().strip())
    pub = ed25519_public(seed)
    printed = re.findall(r"\b[0-9a-f]{64}\b", r.stdout + r.stderr)
    if printed and pub not in printed:
        log(f"WARNING: keygen printed {printed}, python derived {pub}")
    return path, pub


def audit_verify(cfg_path, pub, timeout=120):
    helptext = subprocess.run([TG, "audit", "verify", "--help"], capture_output=True, text=True).stdout
    args = [TG, "audit", "verify", "--config", cfg_path]
    if "--public-key" in helptext:
        args += ["--public-key", pub]
    if "--timeout-secs" in helptext:
        args += ["--timeout-secs", "90"]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, NO_COLOR="1", RUST_LOG="warn"))
    except subprocess.TimeoutExpired:
        return None, "audit verify timed out"
    out = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode, " | ".join(out[-3:])[-500:]


# ---------------------------------------------------------- Postgres wire client

class PgError(Exception):
    def __init__(self, fields):
        self.fields = fields
        self.code = fields.get("C", "?")
        super().__init__(f"{self.code}: {fields.get('M', '')}")


class Pg:
    """A minimal Postgres-wire client: startup, SCRAM-SHA-256, simple and extended query."""

    def __init__(self, port, timeout=30):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def send(self, tag, body):
        self.s.sendall((tag if tag else b"") + struct.pack("!I", len(body) + 4) + body)

    def recv_msg(self):
        while len(self.buf) < 5:
            d = self.s.recv(65536)
            if not d:
                raise ConnectionError("closed by the server")
            self.buf += d
        tag = self.buf[:1]
        n = struct.unpack("!I", self.buf[1:5])[0]
        while len(self.buf) < 1 + n:
            d = self.s.recv(max(65536, 1 + n - len(self.buf)))
            if not d:
                raise ConnectionError("closed by the server")
            self.buf += d
        body = self.buf[5:1 + n]
        self.buf = self.buf[1 + n:]
        return tag, body

    @staticmethod
    def err_fields(body):
        f = {}
        for part in body.split(b"\0"):
            if part:
                f[chr(part[0])] = part[1:].decode("utf-8", "replace")
        return f

    def startup(self, user, database="twinguard"):
        body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        self.send(None, body)

    def server_first(self, user):
        """Start SCRAM for `user`; returns (server-first message, client nonce, client-first-bare)."""
        self.startup(user)
        tag, body = self.recv_msg()
        if tag == b"E":
            raise PgError(self.err_fields(body))
        code = struct.unpack("!I", body[:4])[0]
        if code != 10:
            raise RuntimeError(f"expected SASL, got auth code {code}")
        nonce = base64.b64encode(os.urandom(18)).decode()
        cfb = f"n=,r={nonce}"
        cf = ("n,," + cfb).encode()
        self.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(cf)) + cf)
        tag, body = self.recv_msg()
        if tag == b"E":
            raise PgError(self.err_fields(body))
        code = struct.unpack("!I", body[:4])[0]
        if code != 11:
            raise RuntimeError(f"expected SASLContinue, got {code}")
        return body[4:].decode(), nonce, cfb

    def login(self, user, password):
        sf, nonce, cfb = self.server_first(user)
        attrs = dict(kv.split("=", 1) for kv in sf.split(","))
        salt = base64.b64decode(attrs["s"])
        it = int(attrs["i"])
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, it)
        ck = hmac.new(salted, b"Client Key", "sha256").digest()
        sk = hashlib.sha256(ck).digest()
        cfwp = f"c=biws,r={attrs['r']}"
        am = f"{cfb},{sf},{cfwp}".encode()
        sig = hmac.new(sk, am, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(ck, sig))
        self.send(b"p", (cfwp + ",p=" + base64.b64encode(proof).decode()).encode())
        while True:
            tag, body = self.recv_msg()
            if tag == b"E":
                raise PgError(self.err_fields(body))
            if tag == b"Z":
                return self

    def query(self, sql):
        """Simple protocol. Returns rows (lists of str|None) of the last result; raises PgError."""
        self.send(b"Q", sql.encode() + b"\0")
        return self._collect()

    def _collect(self):
        rows, err = [], None
        while True:
            tag, body = self.recv_msg()
            if tag == b"D":
                n = struct.unpack("!H", body[:2])[0]
                i, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[i:i + 4])[0]
                    i += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[i:i + ln].decode("utf-8", "replace"))
                        i += ln
                rows.append(row)
            elif tag == b"T":
                rows = []
            elif tag == b"E":
                err = PgError(self.err_fields(body))
            elif tag == b"Z":
                if err:
                    raise err
                return rows

    def extended(self, sql, name=""):
        """Extended protocol: Parse, Bind, Describe, Execute, Sync."""
        n = name.encode()
        self.send(b"P", n + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))
        self.send(b"B", b"\0" + n + b"\0" + struct.pack("!HHH", 0, 0, 0))
        self.send(b"D", b"P\0")
        self.send(b"E", b"\0" + struct.pack("!I", 0))
        self.send(b"S", b"")
        return self._collect()


def pg_login(port, user, password, timeout=30):
    return Pg(port, timeout).login(user, password)
