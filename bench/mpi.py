#!/usr/bin/env python3
"""Data-parallel scaling on one machine: the default config's training speed as 2 MPI ranks x 1
thread, 1 process x 1 thread and 1 process x 2 threads (and, with `--ceiling`, two independent
one-thread processes at once: the share of twice one core this machine gives two busy processes
that never communicate), interleaved, `--repeats` times each. Writes every run's numbers and the
medians to `--out`/mpi.json and a Markdown table to `--out`/mpi.md. Needs
`cargo build --release --features mpi` and OpenMPI's `mpirun`.

    python3 bench/mpi.py --data ../shared/data --steps 40 --repeats 2 --ceiling --out bench/results-mpi

The scaling figure is pairs/s inside the training steps (`train.step_pairs_per_s`: batching,
forward, backward, collectives, update); pairs/s over the whole loop (`train.pairs_per_s`) adds
the final validation and checkpoint, which rank 0 does alone, and is reported beside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETS = [
    "train.eval_every_steps=0",
    'train.select="last"',
    "train.checkpoint_every_steps=0",
    "report.sentences=200",
    "report.pairs=100",
    "train.val_pairs=64",
    "report.books_next=false",
]

# (name, ranks, rayon threads per process); ranks -2: two independent one-thread processes at
# once (no communication: the machine's own ceiling for two cores, summed over both)
LAYOUTS = [("2 ranks x 1 thread", 2, 1), ("1 process x 1 thread", 0, 1), ("1 process x 2 threads", 0, 2)]
CEILING = ("2 independent processes x 1 thread", -2, 1)


def ceiling(binary, data, steps, cwd, name):
    """Two one-thread runs at once, each its own process and run folder: their summed pairs/s."""
    procs = []
    for k in range(2):
        args = [binary, "finetune", "--data", data]
        for s in SETS + [f"train.steps={steps}", f"name={name}-{k}"]:
            args += ["--set", s]
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    t = time.time()
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"an independent run failed:\n{err[-3000:]}")
    trains = []
    for k in range(2):
        with open(os.path.join(cwd, "runs", f"{name}-{k}", "report.json")) as f:
            trains.append(json.load(f)["train"])
    return {"step_pairs_per_s": sum(t["step_pairs_per_s"] for t in trains),
            "pairs_per_s": sum(t["pairs_per_s"] for t in trains),
            "each_step_pairs_per_s": [t["step_pairs_per_s"] for t in trains],
            "train_seconds": max(t["seconds"] for t in trains), "steps": steps,
            "wall_seconds": time.time() - t}


def run(binary, data, steps, ranks, threads, cwd, name):
    if ranks == -2:
        return ceiling(binary, data, steps, cwd, name)
    args = [binary, "finetune", "--data", data]
    for s in SETS + [f"train.steps={steps}", f"name={name}"]:
        args += ["--set", s]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if ranks:
        args = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks),
                "-x", f"RAYON_NUM_THREADS={threads}"] + args
    t = time.time()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(cwd, "runs", name, "report.json")) as f:
        train = json.load(f)["train"]
    traffic = train.get("traffic")
    return {
        "step_pairs_per_s": train["step_pairs_per_s"],
        "pairs_per_s": train["pairs_per_s"],
        "train_seconds": train["seconds"],
        "step_seconds": train["step_seconds"],
        "steps": train["steps"],
        "wall_seconds": time.time() - t,
        "collective_s_per_step": traffic and traffic["seconds"] / train["steps"],
        "collective_bytes_per_step": traffic and traffic["bytes"] / train["steps"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--binary", default="target/release/hypersphere")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results-mpi")
    p.add_argument("--ceiling", action="store_true",
                   help="also run two independent 1-thread processes at once (the machine's ceiling)")
    a = p.parse_args()
    binary, data = os.path.abspath(a.binary), os.path.abspath(a.data)
    os.makedirs(a.out, exist_ok=True)
    layouts = LAYOUTS + ([CEILING] if a.ceiling else [])
    runs = {name: [] for name, _, _ in layouts}
    with tempfile.TemporaryDirectory() as cwd:
        for r in range(a.repeats):
            for name, ranks, threads in layouts:
                res = run(binary, data, a.steps, ranks, threads, cwd, f"r{r}-{ranks}-{threads}")
                print(f"repeat {r}: {name}: {res['step_pairs_per_s']:.2f} pairs/s in steps, "
                      f"{res['pairs_per_s']:.2f} over the loop", file=sys.stderr)
                runs[name].append(res)
    med = {name: statistics.median(x["step_pairs_per_s"] for x in rs) for name, rs in runs.items()}
    loop = {name: statistics.median(x["pairs_per_s"] for x in rs) for name, rs in runs.items()}
    names = [n for n, _, _ in LAYOUTS]
    two, one1, one2 = (med[n] for n in names)
    comm = runs[names[0]]
    summary = {
        "command": " ".join(sys.argv),
        "sets": SETS + [f"train.steps={a.steps}"],
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "median_step_pairs_per_s": med,
        "median_loop_pairs_per_s": loop,
        "scaling_efficiency_vs_1x1": two / (2 * one1),
        # Each repeat's 2-rank run over twice the 1 x 1 run next to it: the machine's speed drifts
        # between repeats, and a pair of neighbours shares it.
        "scaling_efficiency_per_repeat": [t["step_pairs_per_s"] / (2 * o["step_pairs_per_s"])
                                          for t, o in zip(runs[names[0]], runs[names[1]])],
        "loop_scaling_efficiency_vs_1x1": loop[names[0]] / (2 * loop[names[1]]),
        "ratio_vs_1x2": two / one2,
        "collective_s_per_step": statistics.median(x["collective_s_per_step"] for x in comm),
        "collective_bytes_per_step": statistics.median(x["collective_bytes_per_step"] for x in comm),
        "step_seconds_2_ranks": statistics.median(x["step_seconds"] / x["steps"] for x in comm),
    }
    summary["median_scaling_efficiency_per_repeat"] = statistics.median(summary["scaling_efficiency_per_repeat"])
    if a.ceiling:
        summary["ceiling_efficiency"] = med[CEILING[0]] / (2 * one1)
    with open(os.path.join(a.out, "mpi.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = ["| layout | pairs/s in steps (median) | runs | pairs/s over the loop (median) |",
             "| --- | --- | --- | --- |"]
    for name, _, _ in layouts:
        each = ", ".join(f"{x['step_pairs_per_s']:.2f}" for x in runs[name])
        lines.append(f"| {name} | {med[name]:.2f} | {each} | {loop[name]:.2f} |")
    lines += [
        "",
        f"scaling efficiency (2 ranks x 1 thread over twice 1 x 1), in steps: "
        f"{summary['scaling_efficiency_vs_1x1']:.3f}; per repeat: "
        f"{', '.join(f'{e:.3f}' for e in summary['scaling_efficiency_per_repeat'])} "
        f"(median {summary['median_scaling_efficiency_per_repeat']:.3f}); "
        f"over the loop: {summary['loop_scaling_efficiency_vs_1x1']:.3f}; "
        f"2 ranks x 1 thread over 1 x 2 threads: {summary['ratio_vs_1x2']:.3f}; "
        f"collectives per step on rank 0: {summary['collective_s_per_step']:.3f} s of "
        f"{summary['step_seconds_2_ranks']:.2f} s, {summary['collective_bytes_per_step'] / 1e6:.2f} MB",
    ]
    if a.ceiling:
        lines.append(f"ceiling (two independent 1-thread processes over twice one): {summary['ceiling_efficiency']:.3f}")
    with open(os.path.join(a.out, "mpi.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
