#!/usr/bin/env python3
"""The Markdown table of a `bench/gpu.sh run`: train-step times of hypersphere and PyTorch at each
shape and dtype (ratio > 1: hypersphere faster), embedding throughput, the device checks.

    python3 bench/gpu_table.py gpu.json
"""
import json
import sys


def main(path):
    with open(path) as f:
        runs = json.load(f)
    print(f"GPU: {str(runs.get('gpu.txt', '?')).strip().splitlines()[-1]}\n")
    print("| sentences x tokens | dtype | hypersphere step ms | PyTorch step ms | ratio (PyTorch / hypersphere) |")
    print("|---|---|---:|---:|---:|")
    for name, ours in sorted(runs.items()):
        if not (name.startswith("hypersphere-") and isinstance(ours, dict)):
            continue
        fixed, dtype = ours["train_fixed"], name.rsplit("-", 1)[1].removesuffix(".json")
        theirs = runs.get(f"torch-{dtype}.json")
        match = [s for s in (theirs or {}).get("train_shapes", [])
                 if (s["pairs"], s["seq"]) == (fixed["pairs"], fixed["seq"])]
        t = match[0]["step_s"] if match else float("nan")
        shape = f"{2 * fixed['pairs']}x{fixed['seq']}"
        print(f"| {shape} | {dtype} | {1e3 * fixed['step_s']:.1f} | {1e3 * t:.1f} | {t / fixed['step_s']:.2f} |")
    print("\n| embedding | sentences/s |\n|---|---:|")
    for name, r in sorted(runs.items()):
        if isinstance(r, dict) and "embed" in r and r["embed"].get("sentences", 0) >= 1000:
            print(f"| {name} | {r['embed']['sentences_per_s']:.0f} |")
    for name, r in sorted(runs.items()):
        if name.startswith("check-") and isinstance(r, dict):
            verdict = "passed" if not r["failures"] else "FAILED: " + "; ".join(r["failures"][:3])
            print(f"\n{name}: loss {r['loss_cpu']:.6f} vs {r['loss_device']:.6f}, worst gradient "
                  f"{r['grads'][0]['name']} {r['grads'][0]['rel']:.2e}; {verdict}")


if __name__ == "__main__":
    main(sys.argv[1])
