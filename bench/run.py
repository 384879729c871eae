#!/usr/bin/env python3
"""Side-by-side benchmarks of Tidings, Nchan and Pushpin on one machine.

    python3 bench/run.py setup                 # apt-get install nginx libnginx-mod-nchan pushpin
    python3 bench/run.py run [--repeat 3] [--targets tidings,nchan,pushpin] [--only fanout-1k-sse,...]
    python3 bench/run.py report                # docs/benchmarks.md + docs/images/bench-*.svg
    python3 bench/run.py compare               # Tidings vs Nchan (and the floor server) on the
                                               #   request/fan-out cells, 3 runs each, servers
                                               #   alternating, ratios into docs/benchmarks.md
    python3 bench/run.py sweep                 # saturation: highest rate with p99 <= 100 ms and
                                               #   no loss, per transport x subscribers x server

Every run starts the server fresh, pinned to core 0 (taskset), and drives it with
`tidings bench` pinned to core 1; results are appended to bench/results/results.jsonl (one JSON
line per run, as `tidings bench` prints it, plus the scenario name). `report` takes medians over
repeated runs. Nothing here needs the network beyond loopback.

`floor` is a server kind too: bench/floor, the least work a user-space server can do for the
SSE, long-poll and publish cells (what the kernel leaves; docs/benchmarks.md, "What the kernel
leaves: the floor server"). It speaks Tidings' paths and wire format, so the generator drives
it as `--target tidings`; it is skipped in cells of other transports.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# Where rows are appended (and `report` reads); another file keeps a trial run out of the report.
RESULTS = os.environ.get("TIDINGS_BENCH_RESULTS", os.path.join(BENCH, "results", "results.jsonl"))
RUNDIR = "/tmp/tidings-bench"
# The load generator (and, unless TIDINGS_SERVER_BIN says otherwise, the server under test).
TIDINGS = os.environ.get("TIDINGS_BENCH_BIN", os.path.join(ROOT, "target", "release", "tidings"))
# The server under test; the load generator is always TIDINGS. Set it to compare two builds
# in one sitting (with --variant to tell their rows apart).
TIDINGS_SERVER = os.environ.get("TIDINGS_SERVER_BIN", TIDINGS)
# The floor server (bench/floor, its own workspace), built into a target dir of its own under
# target/ (two crates: nothing to share with the main build, and no wait on its lock).
FLOOR_TARGET = os.path.join(ROOT, "target", "floor")
FLOOR = os.environ.get("TIDINGS_FLOOR_BIN", os.path.join(FLOOR_TARGET, "release", "tidings-floor"))
FLOOR_TRANSPORTS = {"sse", "long-poll"}
URLS = {
    "tidings": "http://127.0.0.1:8080",
    "nchan": "http://127.0.0.1:8090",
    "pushpin": "http://127.0.0.1:7999",
    "floor": "http://127.0.0.1:8070",
}
PORTS = {"tidings": [8080], "nchan": [8090], "pushpin": [7999, 8092], "floor": [8070]}

# name: (transport, subscribers, channels, publishers, rate msgs/s, seconds of publishing)
SCENARIOS = {
    "idle-sse": ("sse", 5000, 1, 1, 0, 0),
    "idle-ws": ("ws", 5000, 1, 1, 0, 0),
    "idle-long-poll": ("long-poll", 5000, 1, 1, 0, 0),
    "fanout-1k-sse": ("sse", 1000, 1, 1, 100, 8),
    "fanout-1k-ws": ("ws", 1000, 1, 1, 100, 8),
    "fanout-10k-sse": ("sse", 10000, 1, 1, 10, 8),
    "fanout-10k-ws": ("ws", 10000, 1, 1, 10, 8),
    "channels-5k-sse": ("sse", 10000, 5000, 4, 2000, 8),
    "long-poll-1k": ("long-poll", 1000, 1, 1, 20, 8),
    "publish-throughput": ("sse", 10, 10, 8, 0, 5),
    "max-idle-sse": ("sse", 19000, 1, 1, 0, 0),
}
REPEATED = {"fanout-1k-sse", "fanout-1k-ws", "fanout-10k-sse", "fanout-10k-ws",
            "channels-5k-sse", "long-poll-1k", "publish-throughput", "idle-sse", "idle-ws",
            "idle-long-poll"}


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def setup(_args):
    sh(["apt-get", "update", "-qq"])
    sh(["apt-get", "install", "-y", "-qq", "nginx", "libnginx-mod-nchan", "pushpin"],
       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    # The packages start system services on their default ports; the bench runs its own.
    for svc in ("nginx", "pushpin"):
        subprocess.run(["service", svc, "stop"], capture_output=True)


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def wait_port(port, timeout=10.0):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Server:
    """One target started fresh, pinned to core 0; `pids` are what CPU and RSS are read from."""

    def __init__(self, target):
        self.target = target
        self.procs = []
        self.pids = []

    def start(self):
        # Another run's server on the same port would answer in this one's place, and its
        # stop would look like this server going away mid-run (seen when two engineers ran
        # the harness at once): refuse instead.
        for port in PORTS[self.target]:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                continue
            raise RuntimeError(f"port {port} is already in use: is another benchmark running?")
        shutil.rmtree(os.path.join(RUNDIR, self.target), ignore_errors=True)
        d = os.path.join(RUNDIR, self.target)
        os.makedirs(d)
        log = open(os.path.join(d, "server.log"), "w")
        if self.target == "tidings":
            p = subprocess.Popen(["taskset", "-c", "0", TIDINGS_SERVER, "serve", "--listen",
                                  "127.0.0.1:8080"], stdout=log, stderr=log,
                                 env={**os.environ, "TIDINGS_LOG": "warn"})
            self.procs = [p]
            wait_port(8080)
            self.pids = [p.pid]
        elif self.target == "nchan":
            os.makedirs(os.path.join(d, "tmp"))
            shutil.copy(os.path.join(BENCH, "nchan", "nginx.conf"), d)
            p = subprocess.Popen(["taskset", "-c", "0", "nginx", "-p", d, "-c",
                                  os.path.join(d, "nginx.conf")], stdout=log, stderr=log)
            self.procs = [p]
            wait_port(8090)
            time.sleep(0.3)
            self.pids = [p.pid] + descendants(p.pid)
        elif self.target == "floor":
            p = subprocess.Popen(["taskset", "-c", "0", FLOOR, "127.0.0.1:8070"], stdout=log,
                                 stderr=log)
            self.procs = [p]
            wait_port(8070)
            self.pids = [p.pid]
        else:
            conf = open(os.path.join(BENCH, "pushpin", "pushpin.conf.in")).read()
            conf = conf.replace("RUNDIR", d).replace(
                "ROUTES", os.path.join(BENCH, "pushpin", "routes"))
            cpath = os.path.join(d, "pushpin.conf")
            open(cpath, "w").write(conf)
            origin = subprocess.Popen(["taskset", "-c", "0", sys.executable,
                                       os.path.join(BENCH, "pushpin", "origin.py"), "8092"],
                                      stdout=log, stderr=log)
            p = subprocess.Popen(["taskset", "-c", "0", "pushpin", "--config", cpath],
                                 stdout=log, stderr=log, start_new_session=True)
            self.procs = [p, origin]
            wait_port(8092)
            wait_port(7999, 20)
            wait_port(5561, 20)
            time.sleep(1.0)
            # The runner and the services it started (condure, proxy, handler); not the origin.
            self.pids = [p.pid] + descendants(p.pid)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.target} exited at start (code {p.returncode}); "
                                   f"see {os.path.join(d, 'server.log')}")
        return self

    def stop(self):
        for p in self.procs:
            try:
                if self.target == "pushpin" and p is self.procs[0]:
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.terminate()
            except (OSError, ProcessLookupError):
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        time.sleep(0.5)


def run_one(target, name, server):
    transport, n, channels, publishers, rate, duration = SCENARIOS[name]
    # The floor answers Tidings' paths with Tidings' bytes: driven as Tidings.
    wire = "tidings" if target == "floor" else target
    cmd = ["taskset", "-c", "1", TIDINGS, "bench", "--quiet", "--target", wire,
           "--url", URLS[target], "--transport", transport, "-n", str(n), "-c", str(channels),
           "-p", str(publishers), "--rate", str(rate), "--duration", str(duration),
           "--payload", "100", "--settle", "2", "--label", name,
           "--server-pid", ",".join(str(p) for p in server.pids)]
    print("+", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["target"] = target
    r["scenario"] = name
    r["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return r


def loadavg():
    """The 1-minute load average, written beside every row: the cores are shared."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def ensure_release(targets=()):
    if not os.path.exists(TIDINGS):
        sh(["cargo", "build", "--release", "-p", "tidings-cli"], cwd=ROOT)
    if "floor" in targets and not os.path.exists(FLOOR):
        sh(["cargo", "build", "--release", "--manifest-path",
            os.path.join(BENCH, "floor", "Cargo.toml")], cwd=ROOT,
           env={**os.environ, "CARGO_TARGET_DIR": FLOOR_TARGET})


def git_commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip() or None


def run(args):
    targets = args.targets.split(",")
    ensure_release(targets)
    global RESULTS
    if getattr(args, "results", None):
        RESULTS = args.results
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    # Servers alternate run by run (T N F T N F …), so a change in the machine's load lands
    # on all of them rather than on whichever ran last.
    for name in names:
        reps = args.repeat if name in REPEATED else 1
        for _ in range(reps):
            for target in targets:
                if target == "floor" and SCENARIOS[name][0] not in FLOOR_TRANSPORTS:
                    continue
                load_before = loadavg()
                server = Server(target).start()
                try:
                    r = run_one(target, name, server)
                finally:
                    server.stop()
                if r is None:
                    continue
                r["load"] = load_before
                r["commit"] = git_commit()
                if SITTING:
                    r["sitting"] = SITTING
                if args.variant:
                    r["variant"] = args.variant
                s = r.get("server") or {}
                print(f"{target:8} {name:20} deliveries/s={r.get('deliveries_per_s')} "
                      f"cpu/deliv={s.get('cpu_us_per_delivery')}us "
                      f"(sys {s.get('sys_us_per_delivery')}) "
                      f"gen={(r.get('bench') or {}).get('cpu_pct')}% load={load_before} "
                      f"p99={(r.get('latency_us') or {}).get('p99')}us "
                      f"rss/conn={s.get('rss_per_conn_bytes')} anon/conn={s.get('anon_per_conn_bytes')} lost={r['lost']} "
                      f"dups={r['duplicates']} connected={r['connected']}/{r['subscribers']}",
                      file=sys.stderr)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(r) + "\n")


# ---- report ----

def load():
    rows = []
    if os.path.exists(RESULTS):
        for line in open(RESULTS):
            if line.strip():
                rows.append(json.loads(line))
    return rows


def lost(r):
    """Loss over connected subscribers. Rows from before the generator counted it that way
    (no `loss_basis`) also counted every subscriber that never connected as losing all."""
    n = r.get("lost")
    if n is None or r.get("loss_basis") == "connected":
        return n
    missing = r["subscribers"] - r["connected"]
    return max(0, n - missing * r["published"] // max(1, r["channels"]))


def metric(r, key):
    s = r.get("server") or {}
    lat = r.get("latency_us") or {}
    return {
        "cpu": s.get("cpu_us_per_delivery"),
        "rate": r.get("deliveries_per_s"),
        "pubrate": r.get("publish_per_s"),
        "p50": lat.get("p50"),
        "p99": lat.get("p99"),
        # The idle target's number is the anonymous RSS (`RssAnon`): VmRSS also counts the
        # code pages the first connections fault in once. Rows from before session 10 have
        # only VmRSS.
        "mem": s.get("anon_per_conn_bytes", s.get("rss_per_conn_bytes")),
        "lost": lost(r),
        "dups": r.get("duplicates"),
        "benchcpu": (r.get("bench") or {}).get("cpu_us_per_delivery"),
        "benchpct": (r.get("bench") or {}).get("cpu_pct"),
        "serverpct": s.get("cpu_pct"),
        "sys": s.get("sys_us_per_delivery"),
        "user": (round(s["cpu_us_per_delivery"] - s["sys_us_per_delivery"], 2)
                 if s.get("cpu_us_per_delivery") is not None
                 and s.get("sys_us_per_delivery") is not None else None),
        "connected": r.get("connected"),
        "failed": r.get("connect_failed"),
    }[key]


def med(rows, key):
    vals = [metric(r, key) for r in rows]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.median(vals), (min(vals), max(vals))


def fmt(v, digits=1):
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 1000 or isinstance(v, int):
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def svg_bars(path, title, unit, groups, series, values, log=False):
    """Grouped bar chart: values[(group, series)] -> number or None."""
    colors = {"tidings": "#2b7bb9", "nchan": "#3a9a4a", "pushpin": "#d0782a"}
    w, h, left, top, bottom = 760, 360, 70, 40, 90
    vals = [v for v in values.values() if v]
    vmax = max(vals) if vals else 1
    # Keep the scale readable: a bar far above Tidings' and Nchan's is cut at 2.5× their
    # largest and labelled with its real value and a ▲.
    near = [v for (g, s), v in values.items() if v and s in ("tidings", "nchan")]
    if near and vmax > 2.5 * max(near):
        vmax = 2.5 * max(near)
    plot_h = h - top - bottom
    gw = (w - left - 20) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for i in range(5):
        v = vmax * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{w-20}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left-5}" y="{y+4}" text-anchor="end">{v:,.1f}</text>')
    out.append(f'<text x="15" y="{top+plot_h/2}" transform="rotate(-90 15 {top+plot_h/2})" '
               f'text-anchor="middle">{unit}</text>')
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gw * 0.1
        for si, s in enumerate(series):
            v = values.get((g, s))
            if v is None:
                continue
            cut = v > vmax
            bh = plot_h * min(v, vmax) / vmax
            x = x0 + si * bw
            y = top + plot_h - bh
            label = f"{v:,.1f}" + (" ▲" if cut else "")
            opacity = ' opacity="0.6"' if cut else ""
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw-2:.1f}" height="{bh:.1f}" '
                       f'fill="{colors.get(s, "#888")}"{opacity}>'
                       f'<title>{s} {g}: {v:,.1f}</title></rect>')
            out.append(f'<text x="{x+bw/2-1:.1f}" y="{y-3:.1f}" text-anchor="middle" '
                       f'font-size="9">{label}</text>')
        out.append(f'<text x="{x0+gw*0.4:.1f}" y="{top+plot_h+15}" text-anchor="end" '
                   f'transform="rotate(-30 {x0+gw*0.4:.1f} {top+plot_h+15})">{g}</text>')
    for si, s in enumerate(series):
        x = left + 10 + si * 110
        out.append(f'<rect x="{x}" y="{h-18}" width="12" height="12" fill="{colors.get(s)}"/>')
        out.append(f'<text x="{x+16}" y="{h-8}">{s}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


def report(_args):
    all_rows = load()
    rows = [r for r in all_rows if not r.get("variant")]
    baseline = {}
    for r in all_rows:
        if r.get("variant") and r["target"] == "tidings":
            baseline.setdefault(r["scenario"], []).append(r)
    targets = ["tidings", "nchan", "pushpin"]
    by = {}
    for r in rows:
        by.setdefault((r["scenario"], r["target"]), []).append(r)
    names = [n for n in SCENARIOS if any((n, t) in by for t in targets)]
    lines = []
    add = lines.append

    def cell(n, t, key, digits=1):
        v, spread = med(by.get((n, t), []), key)
        if v is None:
            return "—"
        runs = len(by.get((n, t), []))
        if runs > 1 and spread and spread[0] != spread[1]:
            return f"{fmt(v, digits)} ({fmt(spread[0], digits)}–{fmt(spread[1], digits)})"
        return fmt(v, digits)

    add("| scenario | metric | Tidings | Nchan | Pushpin | Tidings/Nchan | Tidings/Pushpin |")
    add("|---|---|---|---|---|---|---|")
    for n in names:
        keys = [("cpu", "server CPU µs/delivery"), ("rate", "deliveries/s"),
                ("p50", "p50 latency µs"), ("p99", "p99 latency µs"),
                ("lost", "lost"), ("dups", "duplicates"), ("benchcpu", "bench CPU µs/delivery")]
        if n.startswith("idle") or n.startswith("max"):
            keys = [("mem", "anon RSS bytes/idle connection"), ("connected", "connected"),
                    ("failed", "connect failures")]
        if n == "publish-throughput":
            keys = [("pubrate", "publishes/s"), ("cpu", "server CPU µs/delivery"),
                    ("lost", "lost"), ("dups", "duplicates")]
        for key, label in keys:
            t, nc, pp = (med(by.get((n, x), []), key)[0] for x in targets)
            r1 = ratio(t, nc) if key in ("cpu", "p50", "p99", "mem", "rate", "pubrate") else ""
            r2 = ratio(t, pp) if key in ("cpu", "p50", "p99", "mem", "rate", "pubrate") else ""
            add(f"| {n} | {label} | {cell(n, 'tidings', key)} | {cell(n, 'nchan', key)} | "
                f"{cell(n, 'pushpin', key)} | {r1} | {r2} |")
    if baseline:
        add("")
        variants = sorted({r["variant"] for r in all_rows if r.get("variant")})
        add(f"Tidings re-run as variant `{', '.join(variants)}` (rows tagged with `--variant`; see the")
        add("text below for what changed), beside the same-run numbers above. A re-run is not the")
        add("same run: compare CPU with care; instruction counts (callgrind) are the reliable A/B.")
        add("")
        add("| scenario | metric | same run as peers | variant re-run | re-run/same run |")
        add("|---|---|---|---|---|")
        for n in [n for n in SCENARIOS if n in baseline and (n, "tidings") in by]:
            keys = [("mem", "anon RSS bytes/idle connection")] if n.startswith(("idle", "max")) \
                else [("cpu", "server CPU µs/delivery"), ("p99", "p99 latency µs")]
            if n == "publish-throughput":
                keys = [("pubrate", "publishes/s"), ("cpu", "server CPU µs/delivery")]
            for key, label in keys:
                b = med(by[(n, "tidings")], key)[0]
                a = med(baseline[n], key)[0]
                add(f"| {n} | {label} | {fmt(b)} | {fmt(a)} | {ratio(a, b)} |")
    table = "\n".join(lines)

    img = os.path.join(ROOT, "docs", "images")
    os.makedirs(img, exist_ok=True)
    load_names = [n for n in names if not n.startswith(("idle", "max")) and n != "publish-throughput"]
    for key, fname, title, unit in [
        ("cpu", "bench-cpu-per-delivery.svg", "Server CPU per delivered message (median)", "µs"),
        ("p99", "bench-p99-latency.svg", "p99 publish→receive latency (median of runs)", "ms"),
        ("p50", "bench-p50-latency.svg", "p50 publish→receive latency (median of runs)", "ms"),
    ]:
        vals = {}
        for n in load_names:
            for t in targets:
                v = med(by.get((n, t), []), key)[0]
                if v is not None and key in ("p99", "p50"):
                    v = v / 1000.0
                vals[(n, t)] = v
        svg_bars(os.path.join(img, fname), title, unit, load_names, targets, vals)
    idle_names = [n for n in names if n.startswith(("idle", "max"))]
    vals = {}
    for n in idle_names:
        for t in targets:
            v = med(by.get((n, t), []), "mem")[0]
            vals[(n, t)] = v / 1024.0 if v is not None else None
    svg_bars(os.path.join(img, "bench-idle-memory.svg"), "Anonymous RSS per idle connection", "KiB",
             idle_names, targets, vals)

    path = os.path.join(ROOT, "docs", "benchmarks.md")
    doc = open(path).read() if os.path.exists(path) else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in doc and end in doc:
        doc = doc[:doc.index(start) + len(start)] + "\n" + table + "\n" + doc[doc.index(end):]
    else:
        doc += f"\n{start}\n{table}\n{end}\n"
    open(path, "w").write(doc)
    print(table)


# ---- compare: the cells, Tidings beside Nchan, as ratios ----

# The cells the request-path targets are stated on (issue #17), and what each is judged by.
COMPARE = ["long-poll-1k", "publish-throughput", "channels-5k-sse", "fanout-1k-sse",
           "fanout-1k-ws", "fanout-10k-sse", "fanout-10k-ws"]
COMPARE_RESULTS = os.path.join(BENCH, "results", "compare.jsonl")


def compare(args):
    """One command for the lead to re-run: fresh rows into their own file (tagged with the
    sitting), then the ratio table into docs/benchmarks.md."""
    args.results = args.results or COMPARE_RESULTS
    # The floor runs only the SSE and long-poll cells (about 5 of the 14 minutes, see
    # docs/benchmarks.md); `--targets tidings,nchan` leaves it out.
    args.targets = args.targets or "tidings,nchan,floor"
    args.only = args.only or ",".join(COMPARE)
    args.variant = ""
    # --sitting adds runs to an earlier sitting (to replace runs that went wrong).
    sitting = args.sitting or time.strftime("%Y-%m-%dT%H:%M")
    global SITTING
    SITTING = sitting
    run(args)
    compare_report(argparse.Namespace(results=args.results, sitting=sitting,
                                      section=args.section))


SITTING = None


def compare_report(args):
    path = args.results or COMPARE_RESULTS
    rows = [json.loads(line) for line in open(path) if line.strip()]
    sittings = sorted({r.get("sitting") for r in rows if r.get("sitting")})
    sitting = args.sitting or (sittings[-1] if sittings else None)
    rows = [r for r in rows if r.get("sitting") == sitting]
    # A run whose server was gone by the end (no CPU sample: its process had exited, every
    # connection closed by it) measured nothing about the server; it is counted, not used.
    gone = [r for r in rows if not r.get("server")]
    rows = [r for r in rows if r.get("server")]
    by = {}
    for r in rows:
        by.setdefault((r["scenario"], r["target"]), []).append(r)
    servers = [t for t in ("tidings", "nchan", "floor") if any(k[1] == t for k in by)]
    names = {"tidings": "Tidings", "nchan": "Nchan", "floor": "floor"}
    lines = [f"Sitting `{sitting}` (commit `{rows[0].get('commit') if rows else '?'}`), "
             f"{len(rows)} runs; medians of the runs, range in brackets; load = 1-minute load "
             "average before each run (min–max). CPU is the server's over the publishing window "
             "(utime + stime from /proc/PID/stat), split into user and kernel (sys); generator "
             "CPU % is the load generator's share of its one core (100 = saturated)."
             + (f" Left out: {len(gone)} runs whose server process had exited before the end "
                f"({', '.join(sorted({r['target'] + ' ' + r['scenario'] for r in gone}))})."
                if gone else ""), ""]
    ratio_cols = [("tidings", "nchan")] + ([("floor", "nchan"), ("tidings", "floor")]
                                           if "floor" in servers else [])
    lines.append("| cell | metric | " + " | ".join(names[t] for t in servers) + " | "
                 + " | ".join(f"{names[a]}/{names[b]}" for a, b in ratio_cols)
                 + " | target | load (" + " / ".join(names[t] for t in servers) + ") |")
    lines.append("|---|---|" + "---|" * (len(servers) + len(ratio_cols) + 2))
    targets = {"long-poll-1k": {"cpu": "≤ 0.5×", "p99": "≤ 0.5×"},
               "publish-throughput": {"pubrate": "≥ 1.5×", "cpu": "≤ 0.6×"},
               "channels-5k-sse": {"cpu": "≤ 0.6×"}}
    for n in COMPARE:
        if not any(by.get((n, t)) for t in servers):
            continue
        keys = [("cpu", "server CPU µs/delivery"), ("user", "… user µs/delivery"),
                ("sys", "… kernel µs/delivery"), ("rate", "deliveries/s"),
                ("p50", "p50 latency µs"), ("p99", "p99 latency µs"),
                ("serverpct", "server CPU %"), ("benchpct", "generator CPU %"),
                ("lost", "lost"), ("dups", "duplicates")]
        if n == "publish-throughput":
            keys = [("pubrate", "publishes/s"), ("cpu", "server CPU µs/publish"),
                    ("user", "… user µs/publish"), ("sys", "… kernel µs/publish"),
                    ("p99", "p99 latency µs"), ("serverpct", "server CPU %"),
                    ("benchpct", "generator CPU %"), ("lost", "lost"), ("dups", "duplicates")]
        for key, label in keys:
            cells = {}
            for t in servers:
                v, spread = med(by.get((n, t), []), key)
                txt = fmt(v)
                if spread and spread[0] != spread[1]:
                    txt += f" ({fmt(spread[0])}–{fmt(spread[1])})"
                cells[t] = (v, txt)
            rs = [ratio(cells[a][0], cells[b][0])
                  if key not in ("lost", "dups", "serverpct", "benchpct") else ""
                  for a, b in ratio_cols]
            tgt = targets.get(n, {}).get(key, "≤ 1× (keep)" if key == "cpu" else "")
            loads = []
            for t in servers:
                ls = [x.get("load") for x in by.get((n, t), []) if x.get("load") is not None]
                loads.append(f"{min(ls):.1f}–{max(ls):.1f}" if ls else "—")
            lines.append(f"| {n} | {label} | " + " | ".join(cells[t][1] for t in servers)
                         + " | " + " | ".join(rs) + f" | {tgt} | "
                         + (" / ".join(loads) if key in ("cpu", "pubrate") else "") + " |")
    table = "\n".join(lines)
    write_section(getattr(args, "section", None) or "compare", table)
    print(table)


def write_section(name, text):
    """Replaces what is between `<!-- NAME:start -->` and `<!-- NAME:end -->` in the doc."""
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    doc = open(path).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in doc and end in doc:
        doc = doc[:doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
    else:
        doc += f"\n{start}\n{text}\n{end}\n"
    open(path, "w").write(doc)


# ---- sweep: the highest publish rate each server sustains ----

SWEEP_RESULTS = os.path.join(BENCH, "results", "sweep.jsonl")
P99_LIMIT_US = 100_000
# Where each series starts, in messages/s on one channel (deliveries/s = rate × subscribers):
# about 20,000 deliveries/s, well inside what either server does, so the first cell passes.
SWEEP_START = {"sse": 20_000, "ws": 20_000, "long-poll": 5_000}
SWEEP_MAX_RATE = 20_000


def sweep_cell(target, transport, n, rate, seconds, server):
    wire = "tidings" if target == "floor" else target
    cmd = ["taskset", "-c", "1", TIDINGS, "bench", "--quiet", "--target", wire,
           "--url", URLS[target], "--transport", transport, "-n", str(n), "-c", "1",
           "-p", "1", "--rate", str(rate), "--duration", str(seconds), "--payload", "100",
           "--settle", "0.5", "--drain", "3", "--label", f"sweep-{transport}-{n}",
           "--server-pid", ",".join(str(p) for p in server.pids)]
    print("+", " ".join(cmd), file=sys.stderr)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(r, rate, seconds, p99_limit_us=P99_LIMIT_US):
    """(passed, why): zero loss and duplicates, every subscriber connected, p99 within the
    limit, and the publisher kept its rate (a server that answers publishes slowly holds the
    rate down: that is saturation too)."""
    if r is None:
        return False, "run failed"
    p99 = (r.get("latency_us") or {}).get("p99")
    if r["connected"] < r["subscribers"]:
        return False, f"{r['subscribers'] - r['connected']} not connected"
    if lost(r):
        told = r.get("gap_notices") or 0
        # A skip with a gap notice is history too short for the lag, told as SPEC §10 says;
        # one without is silent loss, a bug.
        return False, f"lost {lost(r)}" + (f" ({told} gap notices)" if told else " (silent)")
    if r.get("duplicates"):
        return False, f"{r['duplicates']} duplicates"
    if r.get("published", 0) < 0.95 * rate * seconds:
        return False, f"published {r.get('published')} of {int(rate * seconds)}"
    if p99 is None or p99 > p99_limit_us:
        return False, f"p99 {p99} µs"
    return True, "ok"


def sweep(args):
    """Per target × transport × subscribers: double the rate until a cell fails, then bisect
    between the last pass and the first failure (`--bisect` steps). One fresh server per
    series; each cell a fresh `tidings bench` (fresh channel, fresh connections)."""
    ensure_release()
    results = args.results or SWEEP_RESULTS
    os.makedirs(os.path.dirname(results), exist_ok=True)
    sitting = time.strftime("%Y-%m-%dT%H:%M")
    deadline = time.time() + args.budget
    series = [(t, tr, int(n)) for n in args.subscribers.split(",")
              for tr in args.transports.split(",") for t in args.targets.split(",")
              if t != "floor" or tr in FLOOR_TRANSPORTS]
    ensure_release(args.targets.split(","))
    per_series = args.budget / max(1, len(series))
    # 0 = no latency limit: the highest rate with zero loss alone.
    limit_us = args.p99_ms * 1000 if args.p99_ms > 0 else float("inf")
    for target, transport, n in series:
        started = time.time()
        rate = max(1, SWEEP_START[transport] // n)
        best, worst = None, None
        server = Server(target).start()
        try:
            def cell(rate):
                load = loadavg()
                r = sweep_cell(target, transport, n, rate, args.seconds, server)
                ok, why = verdict(r, rate, args.seconds, limit_us)
                row = dict(r or {}, target=target, transport=transport, subscribers=n)
                row["sweep"] = {"sitting": sitting, "rate": rate, "passed": ok, "why": why,
                                "load": load, "p99_limit_ms": args.p99_ms}
                row["commit"] = git_commit()
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                s = (r or {}).get("server") or {}
                print(f"{target:8} {transport:9} n={n:<6} rate={rate:<6} {'PASS' if ok else 'FAIL'} "
                      f"{why:28} p99={((r or {}).get('latency_us') or {}).get('p99')} "
                      f"server={s.get('cpu_pct')}% bench={((r or {}).get('bench') or {}).get('cpu_pct')}% "
                      f"load={load}", file=sys.stderr)
                return ok

            def in_time():
                return time.time() - started < per_series and time.time() < deadline

            if args.rates:
                # Fixed cells only (an A/B of two builds at the rates where they differ):
                # no doubling, no bisection.
                for r in args.rates.split(","):
                    if in_time() and cell(int(r)):
                        best = max(best or 0, int(r))
                continue
            # Up, doubling, until a failure or the cap. A server that coalesces (several
            # queued messages per write) can fail a low rate and pass a higher one: each
            # message is then a whole fan-out of its own, one write per subscriber. So past
            # a failure, `--past` more doublings are tried before the series settles; the
            # report names the failures below the highest pass.
            while in_time() and rate <= SWEEP_MAX_RATE:
                if cell(rate):
                    best = rate
                    rate *= 2
                    continue
                worst = rate
                ahead, passed_ahead = rate * 2, None
                for _ in range(args.past):
                    if not in_time() or ahead > SWEEP_MAX_RATE:
                        break
                    if cell(ahead):
                        passed_ahead = ahead
                        break
                    ahead *= 2
                if passed_ahead is None:
                    break
                # A higher rate passed: go on doubling from there.
                best, worst, rate = passed_ahead, None, passed_ahead * 2
            # The first cell failed: come down, halving, to find any rate that passes.
            if best is None and worst is not None:
                rate = worst // 2
                while in_time() and rate >= 1:
                    if cell(rate):
                        best = rate
                        break
                    worst = rate
                    rate //= 2
            # Bisect (geometric mean) between the last pass and the first failure.
            for _ in range(args.bisect):
                if best is None or worst is None or worst - best <= max(1, best // 8) \
                        or not in_time():
                    break
                mid = int(round((best * worst) ** 0.5))
                if mid in (best, worst):
                    break
                if cell(mid):
                    best = mid
                else:
                    worst = mid
        finally:
            server.stop()
    sweep_report(argparse.Namespace(results=results, sitting=sitting))


def sweep_report(args):
    path = args.results or SWEEP_RESULTS
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r.get("sweep")]
    if args.sitting:
        rows = [r for r in rows if r["sweep"]["sitting"] in args.sitting.split(",")]
    # Each series (transport, subscribers, limit, server) from the last sitting that ran it,
    # so a later sitting that ran only some series adds to the table instead of replacing it.
    latest = {}
    for r in rows:
        key = (r["transport"], r["subscribers"], r["sweep"].get("p99_limit_ms", 100), r["target"])
        latest[key] = max(latest.get(key, ""), r["sweep"]["sitting"])
    series = {}
    for r in rows:
        key = (r["transport"], r["subscribers"], r["sweep"].get("p99_limit_ms", 100), r["target"])
        if r["sweep"]["sitting"] == latest[key]:
            series.setdefault(key, []).append(r)
    rows = [r for rs in series.values() for r in rs]
    sitting = ", ".join(sorted(set(latest.values())))
    lines = [f"Sittings `{sitting}` (commit `{rows[0].get('commit') if rows else '?'}`): "
             f"{len(rows)} cells of {rows[0].get('duration_s', '?') if rows else '?'} s. "
             "Highest rate = the highest publish rate (messages/s, one channel) that passed; "
             "first failure = the lowest that failed, and why. Server and generator CPU are "
             "their cores' shares in the highest passing cell; µs/delivery is the server's.",
             "",
             "| transport | subscribers | p99 limit | server | highest rate (msg/s) | deliveries/s "
             "| p99 ms | server CPU % | µs/delivery | generator CPU % | first failure | load | "
             "Tidings/Nchan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best_of = {}
    for (tr, n, lim, t), rs in sorted(series.items(), key=lambda kv: (
            0 if kv[0][2] else 1, kv[0][1], kv[0][0], kv[0][3] != "tidings")):
        passed = [r for r in rs if r["sweep"]["passed"]]
        failed = [r for r in rs if not r["sweep"]["passed"]]
        best = max(passed, key=lambda r: r["sweep"]["rate"]) if passed else None
        above = [r for r in failed if not best or r["sweep"]["rate"] > best["sweep"]["rate"]]
        first_fail = min(above, key=lambda r: r["sweep"]["rate"]) if above else None
        below = sorted({r["sweep"]["rate"] for r in failed
                        if best and r["sweep"]["rate"] < best["sweep"]["rate"]})
        best_of[(tr, n, lim, t)] = best["sweep"]["rate"] if best else None
        loads = [r["sweep"]["load"] for r in rs if r["sweep"].get("load") is not None]
        if best:
            s = best.get("server") or {}
            lat = (best.get("latency_us") or {}).get("p99")
            bench_pct = (best.get("bench") or {}).get("cpu_pct")
            cols = [f"{best['sweep']['rate']:,}", fmt(best.get("deliveries_per_s")),
                    f"{lat / 1000:.1f}" if lat else "—", fmt(s.get("cpu_pct")),
                    fmt(s.get("cpu_us_per_delivery")), fmt(bench_pct)]
        else:
            cols = ["none passed", "—", "—", "—", "—", "—"]
        ff = (f"{first_fail['sweep']['rate']:,}: {first_fail['sweep']['why']}"
              + (f" (generator {fmt((first_fail.get('bench') or {}).get('cpu_pct'))} %)"
                 if (first_fail.get("bench") or {}).get("cpu_pct") else "")) if first_fail \
            else "none (cap or time)"
        if below:
            ff += f"; failed below it at {', '.join(f'{b:,}' for b in below)}"
        rat = ""
        if t == "nchan":
            a, b = best_of.get((tr, n, lim, "tidings")), best_of.get((tr, n, lim, "nchan"))
            rat = ratio(a, b) if a and b else "—"
        lim_txt = f"{lim:g} ms" if lim else "none"
        lines.append(f"| {tr} | {n:,} | {lim_txt} | {t} | " + " | ".join(cols) + f" | {ff} | "
                     f"{(f'{min(loads):.1f}–{max(loads):.1f}') if loads else '—'} | {rat} |")
    table = "\n".join(lines)
    # Only the committed results file rewrites the docs' table and chart: a sitting kept
    # elsewhere (a worktree's trial, a busy machine) prints its table and leaves them alone.
    if not (getattr(args, "docs", False) or os.path.abspath(path) == os.path.abspath(SWEEP_RESULTS)):
        print(table)
        return
    write_section("sweep", table)
    # The plot: highest passing rate per series, Tidings beside Nchan.
    groups = sorted({(tr, n, lim) for tr, n, lim, _ in series},
                    key=lambda g: (0 if g[2] else 1, g[1], g[0]))
    names = [f"{tr}-{n // 1000}k" + ("" if lim == 100 else f" (p99 {lim:g} ms)" if lim
                                      else " (no p99 limit)") for tr, n, lim in groups]
    vals = {}
    for (tr, n, lim), name in zip(groups, names):
        for t in ("tidings", "nchan", "pushpin"):
            vals[(name, t)] = best_of.get((tr, n, lim, t))
    svg_bars(os.path.join(ROOT, "docs", "images", "bench-saturation.svg"),
             "Highest publish rate with zero loss (p99 ≤ 100 ms unless marked)", "messages/s", names,
             [t for t in ("tidings", "nchan", "pushpin") if any(v for (g, tt), v in vals.items() if tt == t)],
             vals)
    print(table)


# ---- perf: where a cell's server CPU goes (kernel vs user space, top symbols) ----

SYSCALLS = ["sendto", "recvfrom", "read", "write", "writev", "readv", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "futex", "sched_yield", "accept4", "close"]


def perf_cell(args):
    """One cell per target with `perf record -g` on the server's processes over the middle
    of the publishing window; the reports (`--sort dso` and `--sort dso,sym`, no children)
    go to bench/results/perf-<target>-<cell>.txt. Needs root (or perf_event_paranoid <= 1)."""
    targets = args.targets.split(",")
    ensure_release(targets)
    for target in targets:
        server = Server(target).start()
        data = os.path.join(RUNDIR, f"perf-{target}.data")
        try:
            transport, n, channels, publishers, rate, duration = SCENARIOS[args.cell]
            wire = "tidings" if target == "floor" else target
            cmd = ["taskset", "-c", "1", TIDINGS, "bench", "--quiet", "--target", wire,
                   "--url", URLS[target], "--transport", transport, "-n", str(n),
                   "-c", str(channels), "-p", str(publishers), "--rate", str(rate),
                   "--duration", str(duration), "--payload", "100", "--settle", "2",
                   "--label", args.cell, "--server-pid", ",".join(str(p) for p in server.pids)]
            bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            # Connecting and the settle time, then the middle of the publishing window.
            time.sleep(args.delay)
            # Syscalls counted over the same window (tracepoints, beside the sampling).
            pids = ",".join(str(p) for p in server.pids)
            stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", ",".join(
                ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in SYSCALLS]),
                "-p", pids, "--", "sleep", str(args.seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            sh(["perf", "record", "-q", "-g", "-o", data, "-p", pids, "--", "sleep",
                str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            counts = {}
            for line in stat.communicate(timeout=60)[1].splitlines():
                f = line.split(",")
                if len(f) > 2 and f[0].strip().isdigit():
                    counts[f[2].split(":")[-1].replace("sys_enter_", "")] = int(f[0])
            out, _ = bench.communicate(timeout=300)
        finally:
            server.stop()
        r = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        path = os.path.join(BENCH, "results", f"perf-{target}-{args.cell}.txt")
        with open(path, "w") as f:
            s = r.get("server") or {}
            f.write(f"# {target} {args.cell}: perf record -g -p {server.pids} for "
                    f"{args.seconds} s from {args.delay} s into the run; load {loadavg()}; "
                    f"commit {git_commit()}\n# run: cpu {s.get('cpu_us_per_delivery')} µs/delivery "
                    f"(sys {s.get('sys_us_per_delivery')}), lost {r.get('lost')}, "
                    f"dups {r.get('duplicates')}, p99 {(r.get('latency_us') or {}).get('p99')} µs\n")
            # Per delivery: the window's deliveries at the run's average rate.
            per = (r.get("deliveries_per_s") or 0) * args.seconds
            if counts and per:
                f.write("\n## syscalls per delivery (perf stat, same window; "
                        f"{per:,.0f} deliveries at the run's average rate)\n")
                for name, c in sorted(counts.items(), key=lambda kv: -kv[1]):
                    if c:
                        f.write(f"{c / per:8.2f}  {name if name != 'sys_enter' else 'all'}\n")
            for sort, limit in (("dso", 15), ("dso,sym", args.top)):
                rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                      "-g", "none", "--percent-limit", "0.3", "--sort", sort],
                                     capture_output=True, text=True).stdout
                lines = [x for x in rep.splitlines() if x.strip() and not x.startswith("#")]
                f.write(f"\n## perf report --sort {sort} (top {limit})\n")
                f.write("\n".join(lines[:limit]) + "\n")
        print(open(path).read())


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup")
    r = sub.add_parser("run")
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--targets", default="tidings,nchan,pushpin",
                   help="any of tidings, nchan, pushpin, floor (SSE and long-poll cells only)")
    r.add_argument("--only", default="")
    r.add_argument("--variant", default="",
                   help="tag the rows (e.g. 'baseline'); report compares tagged Tidings rows")
    sub.add_parser("report")
    c = sub.add_parser("compare", help="Tidings vs Nchan (and the floor) on the issue's cells")
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--targets", default="", help="default tidings,nchan,floor")
    c.add_argument("--only", default="")
    c.add_argument("--results", default="", help=f"default {COMPARE_RESULTS}")
    c.add_argument("--sitting", default="", help="add to this sitting (default: a new one)")
    c.add_argument("--section", default="compare",
                   help="the <!-- NAME:start/end --> section of docs/benchmarks.md to write")
    c = sub.add_parser("compare-report", help="the ratio table from a compare sitting")
    c.add_argument("--results", default="")
    c.add_argument("--sitting", default="", help="default: the last one in the file")
    c.add_argument("--section", default="compare")
    w = sub.add_parser("sweep", help="saturation: the highest rate with p99 <= 100 ms, no loss")
    w.add_argument("--targets", default="tidings,nchan")
    w.add_argument("--transports", default="sse,ws,long-poll")
    w.add_argument("--subscribers", default="1000,10000")
    w.add_argument("--seconds", type=float, default=3.0, help="publishing time per cell")
    w.add_argument("--bisect", type=int, default=2, help="bisection steps after doubling")
    w.add_argument("--p99-ms", type=float, default=100,
                   help="latency limit of a passing cell; 0 = none (zero loss alone)")
    w.add_argument("--budget", type=float, default=900, help="seconds for the whole sweep")
    w.add_argument("--rates", default="",
                   help="only these rates (msg/s, comma-separated), each once per series")
    w.add_argument("--past", type=int, default=2,
                   help="doublings tried past a failure before a series settles")
    w.add_argument("--results", default="", help=f"default {SWEEP_RESULTS}")
    w = sub.add_parser("sweep-report", help="the table and plot from a sweep sitting")
    w.add_argument("--results", default="")
    w.add_argument("--sitting", default="", help="default: the last one in the file")
    w.add_argument("--docs", action="store_true",
                   help="rewrite the docs' table and chart even from another results file")
    w = sub.add_parser("perf", help="perf record one cell's server: kernel vs user, top symbols")
    w.add_argument("--cell", default="long-poll-1k")
    w.add_argument("--targets", default="tidings,nchan,floor")
    w.add_argument("--delay", type=float, default=5.0, help="seconds into the run to start")
    w.add_argument("--seconds", type=float, default=5.0)
    w.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    {"setup": setup, "run": run, "report": report, "compare": compare,
     "compare-report": compare_report, "sweep": sweep, "sweep-report": sweep_report,
     "perf": perf_cell}[a.cmd](a)


if __name__ == "__main__":
    main()
