"""The Python stream peer (issue 17): what a platform team would write instead of
twinguard, in an afternoon, with confluent-kafka (librdkafka) and scikit-learn.

Per poll of up to --batch records: decode each JSON event, keep per-device
exponentially weighted baselines (mean and variance of every metric), build the
feature row (the 34 metrics and their deviations from the device's baseline, in
standard deviations), score the rows with a scikit-learn RandomForestClassifier in
one call, produce one verdict per event (JSON: device, event time, score,
anomalous, input partition and offset), flush, then commit the consumed offsets
(at-least-once, like twinguard's offsets after acknowledgement). A record that does
not decode gets a dead letter with the reason.

Two modes:
  train:  python stream_peer.py train --dataset WUSTL.csv --out peer.pkl
          The forest is fit on the labelled WUSTL-EHMS-2020 rows with the same
          features, the baselines per source address in file order.
  stream: python stream_peer.py stream --model peer.pkl --bootstrap HOST:PORT \\
            --input T --verdicts T --dlq T --group G --events N
          Runs until N input records are answered, then prints one JSON line of
          figures (records, seconds) and exits.
"""
import argparse
import json
import pickle
import sys
import time

import numpy as np

# The WUSTL-EHMS-2020 metric columns, in the order of the `wustl-flow-vitals/v1`
# schema's metric fields (same meaning, the schema's snake_case names).
CSV_METRICS = [
    "SrcBytes", "DstBytes", "SrcLoad", "DstLoad", "SrcGap", "DstGap", "SIntPkt", "DIntPkt",
    "SIntPktAct", "DIntPktAct", "SrcJitter", "DstJitter", "sMaxPktSz", "dMaxPktSz", "sMinPktSz",
    "dMinPktSz", "Dur", "Trans", "TotPkts", "TotBytes", "Load", "Loss", "pLoss", "pSrcLoss",
    "pDstLoss", "Rate", "Temp", "SpO2", "Pulse_Rate", "SYS", "DIA", "Heart_rate", "Resp_Rate", "ST",
]
FIELDS = [
    "src_bytes", "dst_bytes", "src_load", "dst_load", "src_gap", "dst_gap", "src_int_pkt", "dst_int_pkt",
    "src_int_pkt_act", "dst_int_pkt_act", "src_jitter", "dst_jitter", "s_max_pkt_sz", "d_max_pkt_sz",
    "s_min_pkt_sz", "d_min_pkt_sz", "dur", "trans", "tot_pkts", "tot_bytes", "load", "loss", "p_loss",
    "p_src_loss", "p_dst_loss", "rate", "temp", "spo2", "pulse_rate", "sys", "dia", "heart_rate",
    "resp_rate", "st",
]
ALPHA = 0.05  # weight of the newest event in a device's baseline


class Baselines:
    """Per device: exponentially weighted mean and variance of every metric."""

    def __init__(self):
        self.state = {}

    def features(self, device, x):
        s = self.state.get(device)
        if s is None:
            s = self.state[device] = [x.copy(), np.zeros_like(x)]
        mean, var = s
        z = (x - mean) / np.sqrt(var + 1e-9)
        d = x - mean
        mean += ALPHA * d
        var *= 1.0 - ALPHA
        var += ALPHA * d * (x - mean)
        return np.concatenate([x, z])


def train(args):
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier

    df = pd.read_csv(args.dataset)
    missing = [c for c in CSV_METRICS + ["SrcAddr", "Label"] if c not in df.columns]
    if missing:
        sys.exit(f"stream_peer: {args.dataset} lacks the columns {missing}")
    b = Baselines()
    xs = df[CSV_METRICS].to_numpy(dtype=float)
    rows = [b.features(dev, x) for dev, x in zip(df["SrcAddr"].astype(str), xs)]
    t = time.time()
    rf = RandomForestClassifier(n_estimators=args.trees, n_jobs=1, random_state=args.seed)
    rf.fit(np.array(rows), df["Label"].to_numpy(dtype=int))
    with open(args.out, "wb") as f:
        pickle.dump(rf, f)
    print(json.dumps({"trained_rows": len(rows), "trees": args.trees, "fit_seconds": round(time.time() - t, 2)}))


def clients(args):
    """The consumer (manual commits, from the start) and the idempotent producer."""
    from confluent_kafka import Consumer, Producer

    common = {"bootstrap.servers": args.bootstrap, "log_level": 3}
    c = Consumer(dict(common, **{"group.id": args.group, "enable.auto.commit": False,
                                 "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10}))
    p = Producer(dict(common, **{"enable.idempotence": True, "acks": "all", "linger.ms": 5,
                                 "queue.buffering.max.messages": 1000000}))
    c.subscribe([args.input])
    return c, p


def stream(args):
    with open(args.model, "rb") as f:
        rf = pickle.load(f)
    c, p = clients(args)
    base = Baselines()
    done, started = 0, time.time()

    def send(topic, key, value):
        while True:
            try:
                p.produce(topic, key=key, value=value)
                return
            except BufferError:
                p.poll(0.01)

    while done < args.events:
        msgs = c.consume(args.batch, 0.5)
        if not msgs:
            continue
        rows, kept = [], []
        for m in msgs:
            if m.error():
                sys.exit(f"stream_peer: consume error {m.error()}")
            try:
                ev = json.loads(m.value())
                x = np.array([float(ev.get(f) or 0.0) for f in FIELDS])
                rows.append(base.features(ev["device_id"], x))
                kept.append((m, ev))
            except (ValueError, KeyError, TypeError) as e:
                send(args.dlq, m.key(), json.dumps({"reason": str(e), "partition": m.partition(), "offset": m.offset()}))
        if rows:
            scores = rf.predict_proba(np.array(rows))[:, -1]
            for (m, ev), s in zip(kept, scores):
                send(args.verdicts, m.key(), json.dumps({
                    "device_id": ev["device_id"], "event_time": ev.get("event_time"), "score": float(s),
                    "anomalous": bool(s >= 0.5), "partition": m.partition(), "offset": m.offset()}))
        p.flush(60)
        c.commit(asynchronous=False)
        done += len(msgs)
    c.close()
    print(json.dumps({"records": done, "seconds": round(time.time() - started, 3)}))


def passthrough(args):
    """The ceiling: consume, produce each record unchanged, flush and commit per batch."""
    c, p = clients(args)
    done, started = 0, time.time()
    while done < args.events:
        msgs = c.consume(args.batch, 0.5)
        for m in msgs:
            if m.error():
                sys.exit(f"passthrough: consume error {m.error()}")
            while True:
                try:
                    p.produce(args.verdicts, key=m.key(), value=m.value())
                    break
                except BufferError:
                    p.poll(0.01)
        if msgs:
            p.flush(60)
            c.commit(asynchronous=False)
            done += len(msgs)
    c.close()
    print(json.dumps({"records": done, "seconds": round(time.time() - started, 3)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train", help="fit the forest on a labelled WUSTL-EHMS-2020 CSV")
    t.add_argument("--dataset", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--trees", type=int, default=100)
    t.add_argument("--seed", type=int, default=7)
    for name, fn in (("stream", stream), ("passthrough", passthrough)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        if name == "stream":
            s.add_argument("--model", required=True)
            s.add_argument("--dlq", required=True)
        s.add_argument("--bootstrap", required=True)
        s.add_argument("--input", required=True)
        s.add_argument("--verdicts", required=True, help="output topic (the copy, for passthrough)")
        s.add_argument("--group", required=True)
        s.add_argument("--events", type=int, required=True, help="stop once this many records are answered")
        s.add_argument("--batch", type=int, default=1000, help="records per poll")
    t.set_defaults(fn=train)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
