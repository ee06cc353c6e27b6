#!/usr/bin/env python3
"""Corpora at scale: prepare time and size, finetune start-up and peak memory, per corpus.

For each corpus folder given: `hypersphere prepare CORPUS --out OUT/NAME` (wall and CPU time,
peak memory, size on disk), then a short `finetune` from the prepared folder with the model
measurements cut to a minimum (the seconds from launch to the first training step are the
corpus's cost), and with --full the default run itself on the prepared folder (peak memory).
Writes OUT/scale.json and prints a Markdown table.

    python3 bench/scale.py --bin target/release/hypersphere --out /tmp/scale \\
        --corpus 1x=../shared/data/books/eltec-eng --corpus 100x=/big/corpus100 --full
"""
import argparse, json, os, re, subprocess, sys, time
from pathlib import Path


def timed(cmd, cwd, env=None):
    """Run under /usr/bin/time -v; stderr lines with arrival times, and the time figures."""
    t0 = time.monotonic()
    p = subprocess.Popen(["/usr/bin/time", "-v"] + cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
    out = p.stdout.read()
    p.wait()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n" + "\n".join(l for _, l in lines[-30:]))
    text = "\n".join(l for _, l in lines)
    num = lambda pat: float(re.search(pat, text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = wall.groups()
    return {
        "wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s),
        "user_s": num(r"User time \(seconds\): ([\d.]+)"),
        "sys_s": num(r"System time \(seconds\): ([\d.]+)"),
        "peak_rss_mb": num(r"Maximum resident set size \(kbytes\): (\d+)") / 1024,
    }, lines, out


def first(lines, pattern):
    return next((t for t, l in lines if re.search(pattern, l)), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/hypersphere")
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", action="append", required=True, help="NAME=FOLDER")
    ap.add_argument("--full", action="store_true", help="also the default run on each prepared corpus")
    a = ap.parse_args()
    binary, out = str(Path(a.bin).resolve()), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    earlier = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    results = {}
    for spec in a.corpus:
        name, folder = spec.split("=", 1)
        prepared = out / f"prepared-{name}"
        if (prepared / "manifest.json").exists() and name in earlier:
            # Prepared by an earlier run of this script: its figures are kept.
            print(f"[{name}] prepared earlier: keeping its figures", file=sys.stderr)
            r = {k: earlier[name][k] for k in ["corpus", "books", "sentences", "pairs", "prepare",
                                                 "prepared_bytes", "sentences_per_cpu_s"]}
        else:
            print(f"[{name}] prepare {folder}", file=sys.stderr)
            prep, _, summary = timed([binary, "prepare", folder, "--out", str(prepared)], out, env)
            m = re.search(r"(\d+) books, (\d+) sentences, (\d+) pairs", summary)
            books, sentences, pairs = map(int, m.groups())
            disk = sum(f.stat().st_size for f in prepared.iterdir() if f.is_file())
            r = {"corpus": folder, "books": books, "sentences": sentences, "pairs": pairs,
                 "prepare": prep, "prepared_bytes": disk,
                 "sentences_per_cpu_s": sentences / (prep["user_s"] + prep["sys_s"])}
        # Start-up: the data work to the first step, with the model's own measurements minimal.
        sets = ["report.sentences=2", "report.pairs=2", "train.val_pairs=2", "train.steps=2",
                'train.select="last"', "train.eval_every_steps=0", "eval.tasks=[]", f"name=startup-{name}"]
        cmd = [binary, "finetune", "--force", "--set", f"data.corpus={prepared}"]
        for s in sets:
            cmd += ["--set", s]
        print(f"[{name}] start-up", file=sys.stderr)
        st, lines, _ = timed(cmd, out, env)
        corpus_s = next(float(re.search(r"in ([\d.]+)s$", l).group(1)) for _, l in lines if l.startswith("corpus:"))
        r["startup"] = {"to_first_step_s": first(lines, r"^training from step"), "corpus_load_s": corpus_s,
                        "peak_rss_mb": st["peak_rss_mb"], "overrides": sets}
        if a.full:
            print(f"[{name}] default run", file=sys.stderr)
            full, lines, _ = timed([binary, "finetune", "--force", "--set", f"data.corpus={prepared}",
                                    "--set", f"name=full-{name}"], out, env)
            report = json.loads((out / "runs" / f"full-{name}" / "report.json").read_text())
            r["default_run"] = {**full, "to_first_step_s": first(lines, r"^training from step"),
                                "uniformity_after": report["after"]["uniformity"],
                                "selected_step": report["train"]["selected"]["step"]}
        results[name] = r
        (out / "scale.json").write_text(json.dumps(results, indent=2))
    print("| corpus | books | sentences | pairs | prepare wall s | prepare CPU s | sentences / CPU s | "
          "on disk GB | prepare peak MB | to first step s | corpus load s | default run peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        p = r["prepare"]
        full = r.get("default_run", {}).get("peak_rss_mb")
        print(f"| {name} | {r['books']} | {r['sentences']:,} | {r['pairs']:,} | {p['wall_s']:.1f} | "
              f"{p['user_s'] + p['sys_s']:.1f} | {r['sentences_per_cpu_s']:,.0f} | {r['prepared_bytes'] / 1e9:.2f} | "
              f"{p['peak_rss_mb']:.0f} | {r['startup']['to_first_step_s']:.2f} | {r['startup']['corpus_load_s']:.2f} | "
              f"{'' if full is None else f'{full:.0f}'} |")


if __name__ == "__main__":
    main()
