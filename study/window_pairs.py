#!/usr/bin/env python3
"""Pairs from a window of a book, not only its next sentence (STUDY.md round 9): each sentence
with the k-th sentence after it, k drawn uniform in 1..W, as a `data.pairs` TSV.

    hypersphere pairs --sample 1000000 > train-pairs.txt    # every training pair, seed 42's split
    window_pairs.py train-pairs.txt W OUT.tsv

Book order is rebuilt from the adjacent pairs (A -> B links). A run starts at every sentence that
has not exactly one previous and exactly one next sentence, and continues while the sentence has one next
sentence that has one previous sentence. A run stops at a repeated text, and the sentences after
that point are only picked up again at the next start, so some are lost: 29,887 runs hold
408,093 of the pairs' 506,340 distinct sentences (median run length 8). A pair whose k runs past
the end of its run is dropped, not redrawn (282,664 pairs), so small k are a little more common.
"""

import collections
import random
import sys


def runs(pairs):
    nxt, indeg = collections.defaultdict(list), collections.Counter()
    for a, b in pairs:
        nxt[a].append(b)
        indeg[b] += 1
    out, seen = [], set()
    for s in list(nxt):
        if indeg[s] == 1 and len(nxt[s]) == 1:
            continue  # not a start: one sentence before it (its run may still have stopped there)
        run = [s]
        while len(nxt.get(run[-1], [])) == 1:
            n = nxt[run[-1]][0]
            if indeg[n] != 1 or n in seen:
                break
            run.append(n)
            seen.add(n)
        out.append(run)
    return out


def main():
    src, w, dest = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lines = open(src, encoding="utf-8").read().split("\n")
    pairs = [(a[3:], b[3:]) for a, b in zip(lines, lines[1:]) if a.startswith("A: ") and b.startswith("B: ")]
    rng = random.Random(42)
    rows = []
    found = runs(pairs)
    for run in found:
        for i in range(len(run) - 1):
            k = rng.randint(1, w)
            if i + k < len(run):
                rows.append((run[i], run[i + k]))
    rng.shuffle(rows)
    with open(dest, "w", encoding="utf-8") as f:
        f.write("anchor\tpositive\n")
        for a, b in rows:
            f.write(a.replace("\t", " ") + "\t" + b.replace("\t", " ") + "\n")
    print(f"{len(found)} runs of {sum(map(len, found))} sentences -> {len(rows)} pairs in {dest}")


if __name__ == "__main__":
    main()
