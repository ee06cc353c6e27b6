#!/usr/bin/env python3
"""The quality study (issue 10): train each candidate at an equal budget, evaluate, tabulate.

Every candidate starts from all-MiniLM-L6-v2's [CLS] vector (the cone) and sees the same number
of sentences through the encoder (150 steps x 128 sentences = 19,200; candidates with dropout
positives encode 3 sentences per pair, so they run 100 steps). Each run is scored on:
  - STS-B dev (the selection metric) and STS-B test (max_len 128, full sets);
  - the seven SentEval classification tasks with --quick (1000-example subsets);
  - the held-out geometry of report.json (uniformity t=2, mean cosine, alignment);
  - BOOKS-NEXT (next-sentence retrieval over the held-out books), from report.json, when the
    run measured it (round 6 on; earlier rows leave it empty).

  python3 study/study.py run [--only NAME,...] [--seeds 42,1,2]   # resumable: finished runs are skipped
  python3 study/study.py table                                      # study/results/*.json -> study/results.md
  STUDY_RESULTS=study/results-tok python3 study/study.py ...        # another folder (and table) per round of code

Needs HYPERSPHERE_DATA and a release build (cargo build --release). Standard library only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# STUDY_BIN: a copy of the binary, so that rebuilding during a long study changes nothing.
BIN = Path(os.environ.get("STUDY_BIN", ROOT / "target" / "release" / "hypersphere"))
# STUDY_RESULTS: where the per-run JSON files go (a folder per round of code; the table is
# written beside it as <folder>.md).
RESULTS = Path(os.environ.get("STUDY_RESULTS", ROOT / "study" / "results"))
RUNS = Path(os.environ.get("STUDY_RUNS", "/tmp/hypersphere-study"))
QUICK_TASKS = "MR,CR,SUBJ,MPQA,SST2,TREC,MRPC"

# Overrides on top of configs/study-base.toml. Budget: steps * batch_pairs * views = 19,200.
CANDIDATES = {
    # Baselines.
    "infonce": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.select=\"last\""],
    "infonce-sel": ["loss.kind=\"infonce\"", "loss.tau=0.05"],
    "au-1-1": ["loss.w_align=1", "loss.w_uniform=1", "train.select=\"last\""],
    "au-0.9-0.1-t5": ["loss.w_align=0.9", "loss.w_uniform=0.1", "loss.t=5", "train.select=\"last\""],
    "paper-fixed": ["loss.w_align=0.9", "loss.w_uniform=0.3", "loss.t=5", "train.select=\"last\""],
    # Model selection on STS-B dev alone.
    "au-1-1-sel": ["loss.w_align=1", "loss.w_uniform=1"],
    # A fast output LayerNorm: the cone removed by the shared offset, not by bending every weight.
    "au-1-1-norm": ["loss.w_align=1", "loss.w_uniform=1", "train.norm_lr_scale=1000"],
    "au-1-1-norm-t5": ["loss.w_align=1", "loss.w_uniform=1", "loss.t=5", "train.norm_lr_scale=1000"],
    "au-1-1-norm-t10": ["loss.w_align=1", "loss.w_uniform=1", "loss.t=10", "train.norm_lr_scale=1000"],
    "au-3-1-norm": ["loss.w_align=3", "loss.w_uniform=1", "train.norm_lr_scale=1000"],
    "au-2-1-norm": ["loss.w_align=2", "loss.w_uniform=1", "train.norm_lr_scale=1000"],
    "au-3-1-norm-a1": ["loss.w_align=3", "loss.w_uniform=1", "loss.alpha=1", "train.norm_lr_scale=1000"],
    # InfoNCE's ranking plus an explicit uniformity term, with the fast output LayerNorm.
    "mix-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "train.norm_lr_scale=1000"],
    "mix-0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=0.5", "train.norm_lr_scale=1000"],
    "mix-0.25-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=0.25", "train.norm_lr_scale=1000"],
    "infonce-norm": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.norm_lr_scale=1000"],
    # SimCSE-style: InfoNCE over adjacent and dropout positives (3 sentences per pair: 100 steps).
    "infonce-drop": ["loss.kind=\"infonce\"", "loss.tau=0.05", "loss.w_dropout=1", "train.steps=100"],
    "mix-0.5-drop-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_dropout=1", "loss.w_uniform=0.5", "train.norm_lr_scale=1000", "train.steps=100"],
    # Only the output LayerNorm's bias fast: the shared offset, nothing else.
    "mix-u1-offset": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "train.offset_lr_scale=1000"],
    "mix-u1-t0.5-offset": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "train.offset_lr_scale=1000"],
    "mix-u0.5-offset": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=0.5", "train.offset_lr_scale=1000"],
    "infonce-offset": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.offset_lr_scale=1000"],
    # Dropout views scored with InfoNCE (SimCSE) next to the adjacent pairs; 3 sentences per pair: 100 steps.
    "mix-drop-offset": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_dropout=1", "loss.w_uniform=1", "train.offset_lr_scale=1000", "train.steps=100"],
    # A higher learning rate: 150 steps is a small budget.
    "infonce-lr1e-4": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4"],
    "infonce-lr5e-5": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=5e-5"],
    "mix-norm-lr5e-5": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "train.norm_lr_scale=1000", "train.lr=5e-5"],
    "mix-norm100-lr1e-4": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "train.norm_lr_scale=100", "train.lr=1e-4"],
    "mix-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "train.norm_lr_scale=1000"],
    # The sentence's own mean-pooled vector (same pass, held fixed) as a positive of its [CLS].
    "mix-mean-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.w_mean=1", "train.norm_lr_scale=1000"],
    "mix-mean-t1-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=1", "loss.w_mean=1", "train.norm_lr_scale=1000"],
    "mix-t1-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=1", "train.norm_lr_scale=1000"],
    "infonce-mean3": ["loss.kind=\"infonce\"", "loss.tau=0.05", "loss.w_mean=3"],
    "mix-mean3-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "train.norm_lr_scale=1000"],
    "infonce-mean": ["loss.kind=\"infonce\"", "loss.tau=0.05", "loss.w_mean=1"],
    "au-mean-norm": ["loss.w_align=1", "loss.w_uniform=1", "loss.w_mean=1", "train.norm_lr_scale=1000"],
    # Dropout views as positives (3 sentences per pair: 100 steps).
    "au-drop-norm": ["loss.w_align=0", "loss.w_dropout=1", "loss.w_uniform=1", "train.norm_lr_scale=1000", "train.steps=100"],
    # Relational distillation: [CLS] copies how its own mean-pooled vectors rank the batch
    # (KL of each row's softmax), which leaves the shared offset to the uniformity term.
    "infonce-distill3": ["loss.kind=\"infonce\"", "loss.tau=0.05", "loss.w_distill=3"],
    "mix-distill3-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_distill=3", "train.norm_lr_scale=1000"],
    "mix-mean3-distill3-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "loss.w_distill=3", "train.norm_lr_scale=1000"],
    "distill3-t0.1-u5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=0", "loss.w_align=0", "loss.w_uniform=5", "loss.t=0.1", "loss.w_distill=3", "train.norm_lr_scale=1000"],
    "mix-distill3-t0.1-u5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=5", "loss.t=0.1", "loss.w_distill=3", "train.norm_lr_scale=1000"],
    # [CLS] taught by its own mean-pooled vector alone (no adjacent pairs): how far the mean view goes.
    "infonce-meanonly": ["loss.kind=\"infonce\"", "loss.tau=0.05", "loss.w_align=0", "loss.w_mean=1"],
    "meanonly-t0.1-u5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=0", "loss.w_align=0", "loss.w_uniform=5", "loss.t=0.1", "loss.w_mean=1", "train.norm_lr_scale=1000"],
    # A lower InfoNCE temperature spreads the space by itself (Wang & Liu 2021: small tau -> more uniform).
    "infonce-mean-tau0.02": ["loss.kind=\"infonce\"", "loss.tau=0.02", "loss.w_mean=1"],
    "infonce-mean-tau0.03-norm": ["loss.kind=\"infonce\"", "loss.tau=0.03", "loss.w_mean=1", "train.norm_lr_scale=1000"],
    # Uniformity at small t is mostly a pull of the batch mean towards 0 (log E exp(-t d^2) ~
    # -2t (1 - |mean|^2)): the offset removed with less push between near neighbours.
    "mix-mean3-t0.1-u5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=5", "loss.t=0.1", "loss.w_mean=3", "train.norm_lr_scale=1000"],
    "au-adj+drop-norm": ["loss.w_align=1", "loss.w_dropout=1", "loss.w_uniform=1", "train.norm_lr_scale=1000", "train.steps=100"],
    "au-3adj+1drop-norm": ["loss.w_align=3", "loss.w_dropout=1", "loss.w_uniform=1", "train.norm_lr_scale=1000", "train.steps=100"],
    # Larger batches at the same budget, through GradCache (micro-batches of 64 pairs).
    "infonce-b128": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.batch_pairs=128", "train.micro_batch_pairs=64", "train.steps=75"],
    "mix-mean3-t0.5-norm-b128": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "train.norm_lr_scale=1000", "train.batch_pairs=128", "train.micro_batch_pairs=64", "train.steps=75"],
    "au-1-1-norm-a1": ["loss.w_align=1", "loss.w_uniform=1", "loss.alpha=1", "train.norm_lr_scale=1000"],
    # Round 3: distillation of the mean-pooled vectors' neighbour structure with each row's
    # similarities standardised (z-scores), so the scale is free and spreading costs nothing.
    "mix-zdistill3-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_distill=3", "loss.distill_z_tau=0.5", "train.norm_lr_scale=1000"],
    "mix-mean3-zdistill3-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "loss.w_distill=3", "loss.distill_z_tau=0.5", "train.norm_lr_scale=1000"],
    # The same teacher through the Pearson correlation of all pairwise similarities: blind to a
    # stretch of the whole similarity matrix, not to which sentences are close to everything.
    "mix-mean3-simcorr10-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "loss.w_simcorr=10", "train.norm_lr_scale=1000"],
    "mix-mean3-simcorr100-t0.5-norm": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_uniform=1", "loss.t=0.5", "loss.w_mean=3", "loss.w_simcorr=100", "train.norm_lr_scale=1000"],
    # Round 4 (token-bucketed batches): [CLS] regressed onto its own mean-pooled vector
    # (alignment, not InfoNCE: copy the vector, not just rank it first), with light centering.
    # Untrained, mean pooling scores 82.03 on STS-B test at uniformity -3.2 on ELTeC.
    "au-mean10-t0.5-norm": ["loss.w_align=0", "loss.w_mean=10", "loss.w_uniform=1", "loss.t=0.5", "train.norm_lr_scale=1000"],
    "au-mean10-t0.5-norm-lr1e-4": ["loss.w_align=0", "loss.w_mean=10", "loss.w_uniform=1", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    # The same regression onto a frozen copy of the starting model's mean-pooled vectors.
    "au-meanT10-t0.5-norm": ["loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=1", "loss.t=0.5", "train.norm_lr_scale=1000"],
    "au-meanT10-t0.5-norm-lr1e-4": ["loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=1", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-meanT10-u5-t0.5-norm-lr1e-4": ["loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=5", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-meanT10-u20-t0.5-norm-lr1e-4": ["loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=20", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    # Round 5: adjacent pairs back on top of the frozen-teacher winner (u20 at t=0.5, lr 1e-4).
    "au-meanT10-adj1-u20-t0.5-norm-lr1e-4": ["loss.w_align=1", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=20", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "mix-meanT10-u20-t0.5-norm-lr1e-4": ["loss.kind=\"mix\"", "loss.w_infonce=1", "loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=20", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-meanT10-adj3-u20-t0.5-norm-lr1e-4": ["loss.w_align=3", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=20", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-meanT10-u10-t0.5-norm-lr1e-4": ["loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=10", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-3-1-norm-b128": ["loss.w_align=3", "loss.w_uniform=1", "train.norm_lr_scale=1000", "train.batch_pairs=128", "train.steps=75"],
    # Round 6: the books' adjacent sentences back as positives on top of the default
    # (au-meanT10-u10-t0.5-norm-lr1e-4), scored in-domain on BOOKS-NEXT as well.
    "au-meanT10-adj10-u10-t0.5-norm-lr1e-4": ["loss.w_align=10", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=10", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    "au-meanT10-adj30-u10-t0.5-norm-lr1e-4": ["loss.w_align=30", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=10", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    # InfoNCE over the adjacent pairs alone at the default's rate, its last step (not the best
    # STS-B dev one): how far the books' own positives move BOOKS-NEXT in this budget.
    "infonce-lr1e-4-last": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4", "train.select=\"last\""],
    "mix0.3-meanT10-u10-t0.5-norm-lr1e-4": ["loss.kind=\"mix\"", "loss.w_infonce=0.3", "loss.w_align=0", "loss.w_mean=10", "loss.mean_teacher=true", "loss.w_uniform=10", "loss.t=0.5", "train.norm_lr_scale=1000", "train.lr=1e-4"],
    # Round 7: batches from one stretch of one book (data.local_batches), so the in-batch
    # negatives are the same book's other sentences, as BOOKS-NEXT's candidates are.
    "local-infonce-lr1e-4-last": ["data.local_batches=true", "loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4", "train.select=\"last\""],
    # Round 8: does BOOKS-NEXT grow with the budget? InfoNCE over adjacent pairs alone, 2x and 4x
    # round 6's 150 steps (bf16, which scored as f32 on the default recipe; fewer validations,
    # since the last step is kept anyway).
    "infonce-lr1e-4-last-300-bf16": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4", "train.select=\"last\"", "train.steps=300", "train.eval_every_steps=150", "train.dtype=\"bf16\""],
    "infonce-lr1e-4-last-600-bf16": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4", "train.select=\"last\"", "train.steps=600", "train.eval_every_steps=300", "train.dtype=\"bf16\""],
    # Round 9: the same curve at 16x round 6's budget (153,600 pairs, a third of an epoch).
    "infonce-lr1e-4-last-2400-bf16": ["loss.kind=\"infonce\"", "loss.tau=0.05", "train.lr=1e-4", "train.select=\"last\"", "train.steps=2400", "train.eval_every_steps=1200", "train.dtype=\"bf16\""],
}


def sh(args, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(str(a) for a in args) + "\n")
        f.flush()
        r = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return r.returncode


def eval_json(model, tasks, quick, out, log):
    args = [BIN, "eval", "--model", model, "--tasks", tasks, "--out", out]
    if quick:
        args.append("--quick")
    if sh(args, log) != 0:
        raise SystemExit(f"eval failed: see {log}")
    return json.loads((Path(out) / "eval.json").read_text())


def scores(ev):
    """{task: {metric: value}} from eval.json."""
    return {r["task"]: dict(r["metrics"]) for r in ev["results"]}


def run_one(name, seed):
    dest = RESULTS / f"{name}-s{seed}.json"
    if dest.exists():
        return
    sets = CANDIDATES[name]
    run = f"{name}-s{seed}"
    run_dir = RUNS / run
    log = RUNS / f"{run}.log"
    RUNS.mkdir(parents=True, exist_ok=True)
    args = [BIN, "finetune", "--config", ROOT / "configs" / "study-base.toml", "--force",
            "--set", f"name={run}", "--set", f"out_dir={RUNS}", "--set", f"seed={seed}"]
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    code = sh(args, log)
    train_s = time.time() - t0
    result = {"candidate": name, "seed": seed, "sets": sets, "exit": code, "train_wall_s": round(train_s, 1)}
    if code == 0:
        report = json.loads((run_dir / "report.json").read_text())
        run_toml = (run_dir / "run.toml").read_text()
        result["report"] = {k: report["after"].get(k) for k in ["alignment", "uniformity", "mean_cosine", "isotropy"]}
        result["selected"] = report["train"].get("selected")
        result["warnings"] = report["train"].get("warnings", [])
        model = str(run_dir / "model")
        sts = scores(eval_json(model, "STSB", False, run_dir / "eval-stsb", log))
        quick = scores(eval_json(model, QUICK_TASKS, True, run_dir / "eval-quick", log))
        result["stsb_dev"] = sts["STSB"]["spearman_dev"]
        result["stsb_test"] = sts["STSB"]["spearman_test"]
        result["quick"] = {t: v.get("accuracy") for t, v in quick.items()}
        result["quick_avg"] = statistics.mean(result["quick"].values())
        result["log"] = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
        # BOOKS-NEXT (held-out next-sentence retrieval), measured by finetune before and after.
        for when in ["before", "after"]:
            found = [r for r in (report.get("eval") or {}).get(when) or [] if r.get("task") == "BOOKS-NEXT"]
            if found:
                result[f"books_next_{when}"] = dict(found[0]["metrics"])
    else:
        result["error"] = [l for l in log.read_text().splitlines() if l.startswith("error")][-1:]
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{run}: exit {code}, STS-B test {result.get('stsb_test')}, uniformity {result.get('report', {}).get('uniformity')}", flush=True)


def table():
    rows = {}
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        rows.setdefault(r["candidate"], []).append(r)

    def fmt(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return ""
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    lines = ["| candidate | seeds | STS-B dev | STS-B test | SentEval quick avg | BOOKS-NEXT nDCG@10 | uniformity | mean cos | alignment | selected step | overrides |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name in [n for n in CANDIDATES if n in rows] + [n for n in rows if n not in CANDIDATES]:
        rs = rows[name]
        ok = [r for r in rs if r["exit"] == 0]
        seeds = ",".join(str(r["seed"]) for r in rs)
        if not ok:
            err = (rs[0].get("error") or [""])[0][:110]
            lines.append(f"| {name} | {seeds} | stopped: {err}... | | | | | | | | `{' '.join(rs[0]['sets'])}` |")
            continue
        sel = ",".join(str((r.get("selected") or {}).get("step")) for r in ok)
        lines.append("| " + " | ".join([
            name, seeds,
            fmt([r["stsb_dev"] for r in ok]), fmt([r["stsb_test"] for r in ok]), fmt([r["quick_avg"] for r in ok]),
            fmt([(r.get("books_next_after") or {}).get("ndcg_at_10") for r in ok]),
            fmt([r["report"]["uniformity"] for r in ok]), fmt([r["report"]["mean_cosine"] for r in ok]),
            fmt([r["report"]["alignment"] for r in ok]), sel, "`" + " ".join(rs[0]["sets"]) + "`"]) + " |")
    text = "\n".join(lines) + "\n"
    RESULTS.with_suffix(".md").write_text(text)
    print(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--only", default="")
    ap.add_argument("--seeds", default="42")
    a = ap.parse_args()
    if a.what == "table":
        return table()
    if not BIN.exists():
        sys.exit(f"{BIN} not found: run cargo build --release first")
    names = [n for n in a.only.split(",") if n] or list(CANDIDATES)
    for n in names:
        if n not in CANDIDATES:
            sys.exit(f"unknown candidate {n}; known: {', '.join(CANDIDATES)}")
    for seed in [int(s) for s in a.seeds.split(",")]:
        for n in names:
            run_one(n, seed)
    table()


if __name__ == "__main__":
    main()
