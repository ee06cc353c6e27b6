#!/usr/bin/env python3
"""Where BOOKS-NEXT's bar lies (STUDY.md round 9): what a symmetric embedder would score if it
also knew which sentence came before, or where in the books a sentence sits, and what a query
head trained on frozen vectors can learn.

Input: `hypersphere embed --sentences` files, one per held-out book (rows in book order), and
optionally some training books for the query heads. Usage (the exact commands are in STUDY.md):

    books_next_bounds.py --held B1.safetensors ... [--train T.safetensors ...] [--pairs P.txt] --out F.json

The task is rebuilt from the rows: each row is a query whose one relevant row is the next row of
its book, every row of every book is a candidate, and a row whose vector is the query's own (the same text) is
skipped, as BOOKS-NEXT skips the query's own text (a row followed by its own text is no query).
Differences from the task: sentences under `data.min_tokens` are kept and identical texts are not
merged (the base model scores 2.43 here against the task's 2.50). Queries are every `--stride`-th
row (default all). Needs numpy, safetensors and torch; scikit-learn for `--pairs`.
"""

import argparse
import json
import math

import numpy as np
import torch
from safetensors.numpy import load_file

SAME = 0.99999  # cosine of two rows of one text (unit vectors in f32)


def load(paths):
    return [torch.tensor(load_file(p)["embeddings"]).float() for p in paths]


class Task:
    """Queries (a row and its next row in the same book) over all rows of all books."""

    def __init__(self, books, stride, chunk=1024):
        self.docs = torch.cat(books)
        starts = np.cumsum([0] + [len(b) for b in books])
        self.book = torch.cat([torch.full((len(b),), k) for k, b in enumerate(books)])
        rows = torch.tensor([i for k in range(len(books)) for i in range(starts[k], starts[k + 1] - 1)])
        # A row followed by its own text has nothing to find (the task leaves such pairs out).
        rows = rows[(self.docs[rows] * self.docs[rows + 1]).sum(1) <= SAME]
        self.q = rows[::stride]
        self.chunk = chunk
        # Each query's rows of its own text (identical vectors), found once: [2, k] (query, row).
        same = [torch.nonzero((self.docs[self.q[c]] @ self.docs.T) > SAME).T + torch.tensor([[c[0]], [0]])
                for c in torch.split(torch.arange(len(self.q)), chunk)]
        self.own = torch.cat(same, 1)

    def ranks(self, queries=None, drop=None):
        """0-based rank of each query's next row, the query vectors `queries` (default: the rows'
        own) against the rows; `drop(q)` gives a [len(q), n] mask of candidates removed."""
        out = []
        for c in torch.split(torch.arange(len(self.q)), self.chunk):
            q = self.q[c]
            s = (self.docs[q] if queries is None else queries[c]) @ self.docs.T
            own = self.own[:, (self.own[0] >= c[0]) & (self.own[0] <= c[-1])]
            s[own[0] - c[0], own[1]] = -math.inf
            if drop is not None:
                s[drop(q)] = -math.inf
            out.append((s > s[torch.arange(len(q)), q + 1].unsqueeze(1)).sum(1))
        return torch.cat(out)

    def near(self, q, w, keep_next=True):
        """[len(q), n]: candidates within w rows of each query in its own book (not the query)."""
        pos = torch.arange(len(self.docs), dtype=torch.int32).unsqueeze(0) - q.int().unsqueeze(1)
        m = self.same_book(q) & (pos.abs() <= w) & (pos != 0)
        if keep_next:
            m &= pos != 1
        return m

    def same_book(self, q):
        return self.book.unsqueeze(0) == self.book[q].unsqueeze(1)


def metrics(rank):
    r = rank.double()
    ndcg = torch.where(r < 10, 1.0 / torch.log2(r + 2), torch.zeros(())).mean().item() * 100
    return {"ndcg_at_10": round(ndcg, 3), "recall_at_10": round((r < 10).double().mean().item() * 100, 3),
            "recall_at_100": round((r < 100).double().mean().item() * 100, 3)}


def oracles(task):
    """The base scores with a competitor class removed, or the candidates restricted."""
    out = {"base": metrics(task.ranks())}
    # Perfect knowledge of direction: the previous sentence (and nearer ones) never outrank the next.
    for w in [1, 2, 5, 10, 50]:
        out[f"no_neighbour_within_{w}"] = metrics(task.ranks(drop=lambda q: task.near(q, w)))
    # Perfect knowledge of place: only candidates from the query's book, or within w rows of it.
    out["same_book_only"] = metrics(task.ranks(drop=lambda q: ~task.same_book(q)))
    for w in [100, 300, 1000, 3000]:
        out[f"only_within_{w}"] = metrics(task.ranks(drop=lambda q: ~task.near(q, w, keep_next=False)))
    return out


def query_head(task, train, kind, lr, steps, batch, tau, every, seed):
    """A query-side map (documents stay the frozen vectors) trained by InfoNCE from each training
    row to its next row, in-batch negatives; scored every `every` steps."""
    torch.manual_seed(seed)
    d = task.docs.shape[1]
    if kind == "linear":
        head = torch.nn.Linear(d, d)
        with torch.no_grad():
            head.weight.copy_(torch.eye(d))
            head.bias.zero_()
        apply = head
    else:
        head = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        apply = lambda x: x + head(x)  # noqa: E731 (residual: the identity plus a learned MLP)
    # Consecutive rows of one training book; never a pair across two books.
    rows = torch.cat([torch.arange(len(b) - 1) + off for b, off in zip(train, np.cumsum([0] + [len(b) for b in train]))])
    x = torch.cat(train)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    curve = []
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                q = torch.nn.functional.normalize(apply(task.docs[task.q]), dim=-1)
                curve.append({"step": step, **metrics(task.ranks(queries=q))})
        if step == steps:
            break
        i = rows[torch.randint(0, len(rows), (batch,))]
        q = torch.nn.functional.normalize(apply(x[i]), dim=-1)
        loss = torch.nn.functional.cross_entropy(q @ x[i + 1].T / tau, torch.arange(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"kind": kind, "lr": lr, "steps": steps, "batch": batch, "tau": tau, "train_pairs": len(rows),
            "curve": curve, "best_on_test": max(c["ndcg_at_10"] for c in curve)}


def tfidf(pairs_file, seed, n):
    """TF-IDF cosine (sublinear tf, every word) on the task's own pairs: the lexical baseline.
    Many targets share no word with their query and tie at 0 with thousands of candidates: ties
    count against the target (the texts are distinct, so a tie is no duplicate)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    lines = open(pairs_file, encoding="utf-8").read().split("\n")
    pairs = [(a[3:], b[3:]) for a, b in zip(lines, lines[1:]) if a.startswith("A: ") and b.startswith("B: ")]
    texts = sorted({t for p in pairs for t in p})
    tid = {t: i for i, t in enumerate(texts)}
    q = np.array([(tid[a], tid[b]) for a, b in pairs if a != b])
    pick = q[np.random.default_rng(seed).choice(len(q), min(n, len(q)), replace=False)]
    x = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w+\b").fit_transform(texts)
    s = torch.tensor((x[pick[:, 0]] @ x.T).toarray())
    s[torch.arange(len(pick)), torch.tensor(pick[:, 0])] = -math.inf
    target = s[torch.arange(len(pick)), torch.tensor(pick[:, 1])].unsqueeze(1)
    rank = (s > target).sum(1) + (s == target).sum(1) - 1
    return {"texts": len(texts), "queries": len(pick), **metrics(rank)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", nargs="+", required=True, help="one embed file per held-out book")
    ap.add_argument("--train", nargs="*", default=[], help="embed files of training books (query heads)")
    ap.add_argument("--pairs", help="`hypersphere pairs --sample` output over the held-out books (TF-IDF)")
    ap.add_argument("--stride", type=int, default=1, help="every k-th row is a query")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    task = Task(load(a.held), a.stride)
    out = {"held": a.held, "rows": len(task.docs), "queries": len(task.q), "seed": a.seed, "oracles": oracles(task)}
    print(json.dumps(out["oracles"], indent=1), flush=True)
    if a.train:
        train = load(a.train)
        out["query_heads"] = [query_head(task, train, k, 1e-4, a.steps, 256, 0.05, 500, a.seed) for k in ["linear", "mlp"]]
        for h in out["query_heads"]:
            print(h["kind"], [(c["step"], c["ndcg_at_10"]) for c in h["curve"]], flush=True)
    if a.pairs:
        out["tfidf"] = tfidf(a.pairs, a.seed, 5000)
        print("tfidf", out["tfidf"], flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
