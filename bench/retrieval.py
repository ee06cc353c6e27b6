#!/usr/bin/env python3
"""Retrieval evaluation and pair files at scale, through the release binary.

1. `eval --retrieval` on synthetic BEIR folders of `--docs` documents (and `--queries` queries,
   each judged relevant to one document it shares words with): wall time, the embedding and
   search seconds from eval.json, and peak memory (`/usr/bin/time -v`), against `embed` of the
   same documents with the same model and against the size of the embedding matrix. The model
   is the test suite's tiny BERT shape (hidden 32, 2 layers) with seeded random weights, so
   that a million documents embed in minutes on 2 cores: the search and its memory are what is
   measured; with MiniLM (384 values per row) the matrix is 12x larger and embedding 1M
   documents would take about an hour here.
2. Reading `--pairs` pairs (anchor, positive, hard negative) from Parquet (snappy) and from JSON
   Lines: `hypersphere pairs --stats` with a fresh cache, which reports the seconds spent
   reading and checking the file, and tokenizing it; `--repeats` times each, alternating.

    pip install numpy safetensors pyarrow
    python3 bench/retrieval.py --docs 100000 1000000 --pairs 1000000 --out bench/results-retrieval

Writes retrieval.json and retrieval.md to --out.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"


def tiny_model(folder: Path, seed: int) -> Path:
    """The tiny BERT of tests/it/common.rs (its config and vocabulary), seeded random weights."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for f in ["config.json", "vocab.txt"]:
        shutil.copy(FIXTURE / f, folder / f)
    cfg = json.loads((FIXTURE / "config.json").read_text())
    rng = np.random.default_rng(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    t = {}

    def put(name, shape, one=False):
        w = rng.uniform(-0.1, 0.1, size=shape).astype(np.float32)
        t[name] = w + 1.0 if one else w

    put("embeddings.word_embeddings.weight", (cfg["vocab_size"], h))
    put("embeddings.position_embeddings.weight", (cfg["max_position_embeddings"], h))
    put("embeddings.token_type_embeddings.weight", (cfg["type_vocab_size"], h))
    put("embeddings.LayerNorm.weight", (h,), one=True)
    put("embeddings.LayerNorm.bias", (h,))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, out, inp in [("attention.self.query", h, h), ("attention.self.key", h, h),
                               ("attention.self.value", h, h), ("attention.output.dense", h, h),
                               ("intermediate.dense", i, h), ("output.dense", h, i)]:
            put(p + name + ".weight", (out, inp))
            put(p + name + ".bias", (out,))
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"]:
            put(p + ln + ".weight", (h,), one=True)
            put(p + ln + ".bias", (h,))
    save_file(t, str(folder / "model.safetensors"))
    return folder


def words() -> list:
    vocab = (FIXTURE / "vocab.txt").read_text().split()
    return [w for w in vocab if w.isalpha() and len(w) > 1]


def beir_folder(folder: Path, n_docs: int, n_queries: int, seed: int) -> None:
    rng = random.Random(seed)
    vocab = words()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    docs = []
    with open(folder / "corpus.jsonl", "w") as f, open(folder / "corpus.txt", "w") as lines:
        for d in range(n_docs):
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14)))
            docs.append(text)
            f.write(json.dumps({"_id": f"d{d}", "title": "", "text": text}) + "\n")
            lines.write(text + "\n")
    with open(folder / "queries.jsonl", "w") as f, open(folder / "qrels" / "test.tsv", "w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for k in range(n_queries):
            d = rng.randrange(n_docs)
            shared = rng.sample(docs[d].split(), 4)
            text = " ".join(shared + [rng.choice(vocab) for _ in range(2)])
            f.write(json.dumps({"_id": f"q{k}", "text": text}) + "\n")
            q.write(f"q{k}\td{d}\t1\n")


def timed(args, env=None):
    """Run under /usr/bin/time -v: (wall seconds, peak RSS MB, stdout, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return wall, peak, p.stdout, p.stderr


def retrieval(binary, model, work, n_docs, n_queries, seed):
    folder = work / f"beir-{n_docs}"
    beir_folder(folder, n_docs, n_queries, seed)
    out = work / f"eval-{n_docs}"
    wall, peak, _, _ = timed([binary, "eval", "--model", str(model), "--retrieval", f"synth={folder}",
                              "--no-cache", "--max-len", "32", "--out", str(out)])
    result = json.loads((out / "eval.json").read_text())["results"][0]
    e_wall, e_peak, _, _ = timed([binary, "embed", "--model", str(model), "--input", str(folder / "corpus.txt"),
                                  "--out", str(work / "embed.safetensors"), "--max-len", "32"])
    dim = json.loads((model / "config.json").read_text())["hidden_size"]
    return {
        "documents": n_docs, "queries": n_queries, "dim": dim,
        "matrix_mb": n_docs * dim * 4 / 2**20,
        "eval_wall_s": wall, "eval_peak_mb": peak,
        "eval_embed_s": result["embed_seconds"], "eval_search_s": result["seconds"],
        "ndcg_at_10": dict(result["metrics"])["ndcg_at_10"],
        "embed_wall_s": e_wall, "embed_peak_mb": e_peak,
        "peak_ratio": peak / e_peak,
    }


def pair_files(work, n, seed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    vocab = words()
    sent = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 16)))  # noqa: E731
    cols = {"anchor": [], "positive": [], "negative": []}
    for _ in range(n):
        for c in cols.values():
            c.append(sent())
    jsonl = work / f"pairs-{n}.jsonl"
    with open(jsonl, "w") as f:
        for a, p, q in zip(cols["anchor"], cols["positive"], cols["negative"]):
            f.write(json.dumps({"anchor": a, "positive": p, "negative": q}) + "\n")
    parquet = work / f"pairs-{n}.parquet"
    pq.write_table(pa.table(cols), parquet, compression="snappy")
    return {"jsonl": jsonl, "parquet": parquet}


def read_pairs(binary, model, path, work):
    cache = work / "cache-read"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, HYPERSPHERE_CACHE=str(cache))
    wall, peak, out, _ = timed([binary, "pairs", "--stats", "--set", f"model.source={model}",
                                "--set", f"data.pairs={path}"], env=env)
    m = re.search(r"read in ([\d.]+)s, tokenized in ([\d.]+)s", out)
    return {"read_s": float(m.group(1)), "tokenize_s": float(m.group(2)), "wall_s": wall, "peak_mb": peak,
            "file_mb": path.stat().st_size / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "hypersphere"))
    ap.add_argument("--docs", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default="/tmp/hypersphere-bench-retrieval")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-retrieval"))
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny", a.seed)
    report = {"command": " ".join(sys.argv), "seed": a.seed, "model": "tiny BERT (hidden 32, 2 layers), seeded",
              "retrieval": [], "pairs": None}
    for n in a.docs:
        r = retrieval(a.bin, model, work, n, a.queries, a.seed)
        print(json.dumps(r), flush=True)
        report["retrieval"].append(r)
    if a.pairs:
        files = pair_files(work, a.pairs, a.seed)
        runs = {"jsonl": [], "parquet": []}
        for _ in range(a.repeats):
            for kind in ["parquet", "jsonl"]:
                runs[kind].append(read_pairs(a.bin, model, files[kind], work))
                print(kind, json.dumps(runs[kind][-1]), flush=True)
        best = {k: min(v, key=lambda r: r["read_s"]) for k, v in runs.items()}
        report["pairs"] = {"rows": a.pairs, "runs": runs,
                           "read_ratio_jsonl_over_parquet": best["jsonl"]["read_s"] / best["parquet"]["read_s"]}
    (out / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["| documents | queries | matrix MB | eval wall s | embed s | search s | eval peak MB | `embed` peak MB | ratio |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["retrieval"]:
        md.append(f"| {r['documents']:,} | {r['queries']:,} | {r['matrix_mb']:.0f} | {r['eval_wall_s']:.1f} | "
                  f"{r['eval_embed_s']:.1f} | {r['eval_search_s']:.1f} | {r['eval_peak_mb']:.0f} | "
                  f"{r['embed_peak_mb']:.0f} | {r['peak_ratio']:.2f} |")
    if report["pairs"]:
        md += ["", "| pair file | MB | read s (best) | tokenize s | peak MB |", "|---|---:|---:|---:|---:|"]
        for kind, rs in report["pairs"]["runs"].items():
            b = min(rs, key=lambda r: r["read_s"])
            md.append(f"| {kind} | {b['file_mb']:.0f} | {b['read_s']:.2f} | {b['tokenize_s']:.2f} | {b['peak_mb']:.0f} |")
    (out / "retrieval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
