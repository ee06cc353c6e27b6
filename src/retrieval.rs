//! Retrieval scored as BEIR and MTEB score it: exact cosine search (rows are unit vectors, so
//! dot products), then nDCG@10, MRR@10 and Recall@10/@100 against binary relevance. The search
//! keeps only each query's top `k`, so memory is the embeddings plus `k` hits per query, never
//! a queries x documents matrix.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Retrieval scores averaged over the queries (each in [0, 1]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    pub queries: usize,
    pub documents: usize,
    pub ndcg_at_10: f64,
    pub mrr_at_10: f64,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
}

/// Queries and documents scored together per block: a block of scores is this many queries by
/// [`DOC_BLOCK`] documents (512 KiB), so memory does not grow with the corpus.
const QUERY_BLOCK: usize = 64;
const DOC_BLOCK: usize = 2048;

/// Each query's `k` best documents (index, score), best first; equal scores rank the lower
/// index first, so the result does not depend on the thread count. `skip(q, d)` leaves
/// document `d` out for query `q` (the query's own text, say). Scores come from a matrix
/// product per block of queries and documents (one block of scores per thread), each block's
/// product on one thread, so the sums do not depend on scheduling either.
pub fn top_k(
    queries: &[f32],
    docs: &[f32],
    dim: usize,
    k: usize,
    skip: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<Vec<(usize, f32)>> {
    let mut search = TopK::new(queries, dim, k);
    search.add(docs, 0, skip);
    search.finish()
}

/// An exact search fed documents a block at a time, in index order: memory is the queries,
/// `k` hits per query and one block of scores per thread, whatever the number of documents.
pub struct TopK<'q> {
    queries: &'q [f32],
    dim: usize,
    k: usize,
    best: Vec<Vec<(usize, f32)>>,
}

impl<'q> TopK<'q> {
    pub fn new(queries: &'q [f32], dim: usize, k: usize) -> Self {
        let dim = dim.max(1);
        let best = vec![Vec::with_capacity(k + 1); queries.len() / dim];
        Self { queries, dim, k, best }
    }

    /// Documents `first..first + docs.len() / dim` (rows of `docs`), after every earlier one.
    pub fn add(&mut self, docs: &[f32], first: usize, skip: &(dyn Fn(usize, usize) -> bool + Sync)) {
        let (dim, k) = (self.dim, self.k);
        let n_docs = docs.len() / dim;
        self.queries.par_chunks(QUERY_BLOCK * dim).zip(self.best.par_chunks_mut(QUERY_BLOCK)).enumerate().for_each(
            |(b, (block, best))| {
                let nq = block.len() / dim;
                let mut scores = vec![0f32; nq * DOC_BLOCK];
                for d0 in (0..n_docs).step_by(DOC_BLOCK) {
                    let nd = DOC_BLOCK.min(n_docs - d0);
                    block_scores(block, &docs[d0 * dim..(d0 + nd) * dim], nq, nd, dim, &mut scores);
                    for (i, hits) in best.iter_mut().enumerate() {
                        let q = b * QUERY_BLOCK + i;
                        for (j, &s) in scores[i * nd..(i + 1) * nd].iter().enumerate() {
                            let d = first + d0 + j;
                            // Documents come in index order, so a tie never displaces an earlier one.
                            if hits.len() == k && hits.last().is_none_or(|&(_, worst)| s <= worst) || skip(q, d) {
                                continue;
                            }
                            let at = hits.partition_point(|&(_, h)| h >= s);
                            hits.insert(at, (d, s));
                            hits.truncate(k);
                        }
                    }
                }
            },
        );
    }

    /// Each query's hits, best first.
    pub fn finish(self) -> Vec<Vec<(usize, f32)>> {
        self.best
    }
}

/// `out[q, d] = queries[q] . docs[d]` for `nq` queries and `nd` documents of `dim` values, row
/// by row (`out` is read as `nq` rows of `nd`): documents read column-wise as `docsᵀ`.
fn block_scores(queries: &[f32], docs: &[f32], nq: usize, nd: usize, dim: usize, out: &mut [f32]) {
    crate::cpu::gemm_small(nq, nd, dim, out, nd, (queries, dim, 1), (docs, 1, dim));
}

/// The scores of `ranked` (each query's documents, best first) against `relevant` (each
/// query's relevant documents; queries without any are left out).
pub fn score(ranked: &[Vec<(usize, f32)>], relevant: &[Vec<usize>], documents: usize) -> Retrieval {
    let discount = |i: usize| 1.0 / ((i + 2) as f64).log2();
    let (mut ndcg, mut mrr, mut r10, mut r100, mut n) = (0.0, 0.0, 0.0, 0.0, 0usize);
    for (hits, rel) in ranked.iter().zip(relevant) {
        if rel.is_empty() {
            continue;
        }
        n += 1;
        let is_rel = |d: &usize| rel.contains(d);
        let dcg: f64 = hits.iter().take(10).enumerate().filter(|(_, (d, _))| is_rel(d)).map(|(i, _)| discount(i)).sum();
        let ideal: f64 = (0..rel.len().min(10)).map(discount).sum();
        ndcg += dcg / ideal;
        mrr += hits.iter().take(10).position(|(d, _)| is_rel(d)).map_or(0.0, |i| 1.0 / (i + 1) as f64);
        let found = |k: usize| hits.iter().take(k).filter(|(d, _)| is_rel(d)).count() as f64 / rel.len() as f64;
        r10 += found(10);
        r100 += found(100);
    }
    let m = n.max(1) as f64;
    Retrieval {
        queries: n,
        documents,
        ndcg_at_10: ndcg / m,
        mrr_at_10: mrr / m,
        recall_at_10: r10 / m,
        recall_at_100: r100 / m,
    }
}

/// Next-sentence retrieval over pairs of a corpus: each pair's first sentence is a query, the
/// distinct second sentences are the documents, and a query's relevant document is its own
/// second sentence. A document with the query's own text is left out (in a book the next
/// pair's first sentence is this pair's second). `a` and `b` are the unit-vector embeddings of
/// the first and second sentences, row by row.
pub fn next_sentence(first: &[&str], second: &[&str], a: &[f32], b: &[f32], dim: usize) -> Retrieval {
    let mut index = std::collections::HashMap::new();
    let mut doc_rows = Vec::new();
    for (i, text) in second.iter().enumerate() {
        index.entry(*text).or_insert_with(|| {
            doc_rows.push(i);
            doc_rows.len() - 1
        });
    }
    let docs: Vec<f32> = doc_rows.iter().flat_map(|&i| b[i * dim..(i + 1) * dim].iter().copied()).collect();
    let doc_text: Vec<&str> = doc_rows.iter().map(|&i| second[i]).collect();
    let skip = |q: usize, d: usize| doc_text[d] == first[q];
    let ranked = top_k(a, &docs, dim, 100, &skip);
    let relevant: Vec<Vec<usize>> =
        first.iter().zip(second).map(|(q, s)| if q == s { Vec::new() } else { vec![index[s]] }).collect();
    score(&ranked, &relevant, doc_rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers: one query whose relevant document is ranked 2nd of 3, one that finds it
    /// first, one with no relevant document (left out).
    #[test]
    fn scores_match_hand_computed_values() {
        let ranked = vec![vec![(4, 0.9), (7, 0.5), (1, 0.1)], vec![(2, 0.8), (4, 0.3)], vec![(0, 0.1)]];
        let relevant = vec![vec![7], vec![2, 9], vec![]];
        let s = score(&ranked, &relevant, 10);
        assert_eq!(s.queries, 2);
        let ndcg_a = (1.0 / 3f64.log2()) / 1.0;
        let ndcg_b = 1.0 / (1.0 + 1.0 / 3f64.log2());
        assert!((s.ndcg_at_10 - (ndcg_a + ndcg_b) / 2.0).abs() < 1e-12, "{s:?}");
        assert!((s.mrr_at_10 - (0.5 + 1.0) / 2.0).abs() < 1e-12);
        assert!((s.recall_at_10 - (1.0 + 0.5) / 2.0).abs() < 1e-12);
    }

    /// The search equals sorting every score (ties by index), whatever the skips.
    #[test]
    fn top_k_is_the_sorted_prefix() {
        let dim = 3;
        let q = [1.0, 0.0, 0.0, 0.0, 0.6, 0.8];
        let d = [0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let skip = |q: usize, d: usize| q == 1 && d == 4;
        let got = top_k(&q, &d, dim, 3, &skip);
        for (qi, hits) in got.iter().enumerate() {
            let mut all: Vec<(usize, f32)> = (0..5)
                .filter(|&di| !skip(qi, di))
                .map(|di| (di, (0..dim).map(|j| q[qi * dim + j] * d[di * dim + j]).sum()))
                .collect();
            all.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            all.truncate(3);
            assert_eq!(hits, &all, "query {qi}");
        }
        assert_eq!(got[0][..2], [(1, 1.0), (0, 0.5)]);
    }

    /// Over several blocks of queries and documents, with many ties (small integer vectors,
    /// whose dot products are exact), the blocked search equals a plain sort of every score.
    #[test]
    fn blocked_search_equals_a_full_sort() {
        let dim = 5;
        let (nq, nd, k) = (QUERY_BLOCK * 2 + 7, DOC_BLOCK * 2 + 13, 20);
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % 5) as f32 - 2.0
        };
        let q: Vec<f32> = (0..nq * dim).map(|_| next()).collect();
        let d: Vec<f32> = (0..nd * dim).map(|_| next()).collect();
        let skip = |q: usize, d: usize| (q + d).is_multiple_of(7);
        let got = top_k(&q, &d, dim, k, &skip);
        assert_eq!(got.len(), nq);
        // Fed in uneven pieces, as a search streams documents from a file: the same hits.
        let mut search = TopK::new(&q, dim, k);
        for (first, end) in [(0, 7), (7, 3000), (3000, nd)] {
            search.add(&d[first * dim..end * dim], first, &skip);
        }
        assert_eq!(search.finish(), got);
        for (qi, hits) in got.iter().enumerate() {
            let mut all: Vec<(usize, f32)> = (0..nd)
                .filter(|&di| !skip(qi, di))
                .map(|di| (di, (0..dim).map(|j| q[qi * dim + j] * d[di * dim + j]).sum()))
                .collect();
            all.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            all.truncate(k);
            assert_eq!(hits, &all, "query {qi}");
        }
    }

    /// Next-sentence retrieval leaves out the query's own text and merges repeated documents.
    #[test]
    fn next_sentence_skips_the_query_itself() {
        // Sentences s0..s3 of a book: pairs (s0,s1), (s1,s2), (s2,s3); 2-d unit vectors.
        let first = ["s0", "s1", "s2"];
        let second = ["s1", "s2", "s3"];
        let v = |deg: f32| [deg.to_radians().cos(), deg.to_radians().sin()];
        // Gaps shrink, so each sentence is nearer the next than the one before.
        let emb: Vec<[f32; 2]> = vec![v(0.0), v(20.0), v(35.0), v(45.0)];
        let a: Vec<f32> = [0, 1, 2].iter().flat_map(|&i| emb[i]).collect();
        let b: Vec<f32> = [1, 2, 3].iter().flat_map(|&i| emb[i]).collect();
        let r = next_sentence(&first, &second, &a, &b, 2);
        // Without the skip, queries s1 and s2 would find themselves first.
        assert_eq!((r.queries, r.documents), (3, 3));
        assert!((r.ndcg_at_10 - 1.0).abs() < 1e-12 && (r.mrr_at_10 - 1.0).abs() < 1e-12, "{r:?}");
    }
}
