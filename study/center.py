#!/usr/bin/env python3
"""Post-hoc centering of a model's embeddings: what removing the offset costs on STS-B test.

Embeds STS-B test (both sides) and 3,000 sentences of one held-out ELTeC book with `hypersphere
embed`, then for c in 0..1 subtracts c times the mean of the book's last 1,000 sentences,
renormalises and prints STS-B test Spearman (x100, ties by order) with uniformity (t = 2) and
mean cosine over the book's first 2,000 sentences. Needs numpy and safetensors (Python).

  HYPERSPHERE_DATA=../shared/data python3 study/center.py MODEL_SPEC [--bin target/release/hypersphere]
"""
import argparse, os, random, re, subprocess, tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--bin", default="target/release/hypersphere")
    ap.add_argument("--book", default="ENG18632_Reade", help="a held-out book of the default split")
    a = ap.parse_args()
    data = Path(os.environ["HYPERSPHERE_DATA"])
    rows = [l.rstrip("\n").split("\t") for l in open(data / "sts/STSBenchmark/sts-test.csv", encoding="utf-8")]
    rows = [r for r in rows if len(r) >= 7]
    gold = np.array([float(r[4]) for r in rows])
    sents = []
    for line in open(data / "books/eltec-eng" / f"{a.book}.txt", encoding="utf-8"):
        sents += [s for s in re.split(r"(?<=[.!?])\s+", line.strip()) if len(s.split()) >= 4]
    random.Random(1).shuffle(sents)
    with tempfile.TemporaryDirectory() as tmp:
        emb = {}
        for name, texts in [("s1", [r[5] for r in rows]), ("s2", [r[6] for r in rows]), ("book", sents[:3000])]:
            (Path(tmp) / f"{name}.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
            subprocess.run([a.bin, "embed", "--model", a.model, "--input", f"{tmp}/{name}.txt", "--out",
                            f"{tmp}/{name}.safetensors"], check=True, capture_output=True)
            emb[name] = load_file(f"{tmp}/{name}.safetensors")["embeddings"].astype(np.float64)

    def rank(x):
        r = np.empty(len(x)); r[np.argsort(x)] = np.arange(len(x)); return r

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    mu = emb["book"][2000:].mean(0)
    off = ~np.eye(2000, dtype=bool)
    print(f"{a.model}\n| c | STS-B test | uniformity (t=2) | mean cos |\n|---:|---:|---:|---:|")
    for c in [0.0, 0.5, 0.8, 0.9, 1.0]:
        x, y, h = (unit(emb[k] - c * mu) for k in ["s1", "s2", "book"])
        h = h[:2000]
        sims = h @ h.T
        uniformity = np.log(np.exp(-2 * (2 - 2 * sims[off])).mean())
        spearman = 100 * np.corrcoef(rank((x * y).sum(1)), rank(gold))[0, 1]
        print(f"| {c} | {spearman:.2f} | {uniformity:.2f} | {sims[off].mean():.3f} |")


if __name__ == "__main__":
    main()
