//! The order pairs are trained in: per epoch, a seeded random order cut into length-sorted
//! batches, computed one batch at a time so that a corpus of any size costs no memory.

use crate::error::Result;

/// Batches of this many consecutive (shuffled) batches are sorted by length together: padding
/// drops while batches stay random.
pub const BUCKET_BATCHES: usize = 50;

/// splitmix64: a well-mixed 64-bit value from a counter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seeded permutation of `0..n`, evaluated one element at a time in O(1) memory: a 4-round
/// Feistel network over the smallest power of four that holds n (a bijection there), walking
/// values that land outside `0..n` on through the network until one lands inside (a bijection
/// of `0..n`; under 4 passes on average).
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    half: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let half = bits.div_ceil(2);
        let keys = std::array::from_fn(|i| mix(seed ^ mix(i as u64 + 1)));
        Self { n, half, keys }
    }

    fn network(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half) - 1;
        let (mut l, mut r) = (x >> self.half, x & mask);
        for k in self.keys {
            (l, r) = (r, l ^ (mix(r ^ k) & mask));
        }
        (l << self.half) | r
    }

    /// The element at position `i` (< n).
    pub fn at(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.network(i);
        while x >= self.n {
            x = self.network(x);
        }
        x
    }
}

/// One epoch's batches of `batch` pair indices out of `0..n`: the pairs in a seeded random
/// order, cut into windows of [`BUCKET_BATCHES`] batches, each window sorted by length and cut
/// into batches, the batches visited in a second seeded order. Every batch is full (the last
/// `n % batch` pairs of the order sit the epoch out) and none shares a pair.
///
/// [`EpochOrder::local`] keeps each window to consecutive pairs instead (a stretch of one book).
#[derive(Clone, Debug)]
pub struct EpochOrder {
    pairs: Permutation,
    batches: Permutation,
    n: usize,
    batch: usize,
    /// Local windows: the seed of their inner orders, and where the first window starts.
    local: Option<(u64, usize)>,
    seed: u64,
}

impl EpochOrder {
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        let count = (n / batch.max(1)) as u64;
        let (pairs, batches) = (Permutation::new(n as u64, mix(seed)), Permutation::new(count, mix(!seed)));
        Self { pairs, batches, n, batch: batch.max(1), local: None, seed }
    }

    /// With `local`, each window of [`BUCKET_BATCHES`] batches takes `batch x BUCKET_BATCHES`
    /// consecutive pairs of the corpus order (shuffled among themselves; the windows start at
    /// a seeded offset, so each epoch cuts them elsewhere): the pairs of a batch come from one
    /// stretch of one book, and its in-batch negatives are that stretch's other sentences.
    pub fn local(mut self, local: bool) -> Self {
        self.local =
            local.then(|| (mix(self.seed ^ 0x5EED_10CA), (mix(self.seed ^ 0x0FF5E7) % self.n.max(1) as u64) as usize));
        self
    }

    /// The pair at position `p` of the epoch's order.
    fn pair_at(&self, p: usize) -> usize {
        let Some((seed, shift)) = self.local else {
            return self.pairs.at(p as u64) as usize;
        };
        let size = self.batch * BUCKET_BATCHES;
        let (w, o) = (p / size, p % size);
        let len = size.min(self.n - w * size);
        let inner = Permutation::new(len as u64, mix(seed ^ w as u64)).at(o as u64) as usize;
        (w * size + inner + shift) % self.n
    }

    /// Batches in the epoch.
    pub fn len(&self) -> usize {
        self.n / self.batch
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `j`-th batch (`j < len()`), its pairs sorted by `len_of` (a stable sort).
    pub fn batch(&self, j: usize, len_of: &dyn Fn(usize) -> Result<usize>) -> Result<Vec<usize>> {
        let b = self.batches.at(j as u64) as usize;
        let (window, chunk) = (b / BUCKET_BATCHES, b % BUCKET_BATCHES);
        let size = self.batch * BUCKET_BATCHES;
        let span = window * size..((window + 1) * size).min(self.n);
        let mut keyed = span
            .map(|p| {
                let i = self.pair_at(p);
                Ok((len_of(i)?, i))
            })
            .collect::<Result<Vec<(usize, usize)>>>()?;
        keyed.sort_by_key(|&(len, _)| len);
        Ok(keyed[chunk * self.batch..(chunk + 1) * self.batch].iter().map(|&(_, i)| i).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_bijections() {
        for n in [1u64, 2, 3, 5, 16, 17, 1000, 4097] {
            for seed in [0, 7] {
                let p = Permutation::new(n, seed);
                let mut seen: Vec<u64> = (0..n).map(|i| p.at(i)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n} seed {seed}");
            }
        }
        // Seeds give different orders, and the order is not the identity.
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        let (va, vb): (Vec<u64>, Vec<u64>) =
            ((0..1000).map(|i| a.at(i)).collect(), (0..1000).map(|i| b.at(i)).collect());
        assert_ne!(va, vb);
        assert!(va.iter().enumerate().filter(|(i, &v)| *i as u64 == v).count() < 20);
    }

    #[test]
    fn batches_are_full_disjoint_and_bucketed() {
        let lens: Vec<usize> = (0..1000).map(|i| (i * 37) % 101).collect();
        let order = EpochOrder::new(1000, 8, 1);
        let batches: Vec<Vec<usize>> = (0..order.len()).map(|j| order.batch(j, &|i| Ok(lens[i])).unwrap()).collect();
        assert_eq!(batches.len(), 1000 / 8);
        assert!(batches.iter().all(|b| b.len() == 8));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1000);
        // Within a batch lengths are close: the mean spread is far below the global spread.
        let spread: f64 = batches
            .iter()
            .map(|b| {
                let (lo, hi) = (b.iter().map(|&i| lens[i]).min().unwrap(), b.iter().map(|&i| lens[i]).max().unwrap());
                (hi - lo) as f64
            })
            .sum::<f64>()
            / batches.len() as f64;
        assert!(spread < 10.0, "mean in-batch spread {spread}");
        // Same seed, same order; another seed, another.
        let again = EpochOrder::new(1000, 8, 1);
        assert!((0..again.len()).all(|j| again.batch(j, &|i| Ok(lens[i])).unwrap() == batches[j]));
        let other = EpochOrder::new(1000, 8, 2);
        assert_ne!(other.batch(0, &|i| Ok(lens[i])).unwrap(), batches[0]);
        // A remainder: 1003 pairs in batches of 8 leave 3 out, every batch still full.
        let odd = EpochOrder::new(1003, 8, 3);
        let all: Vec<usize> = (0..odd.len()).flat_map(|j| odd.batch(j, &|i| Ok(i % 7)).unwrap()).collect();
        assert_eq!(all.len(), 1000);
    }

    /// The shortest stretch of the circular order 0..n that holds all of `batch`.
    fn circular_span(batch: &[usize], n: usize) -> usize {
        let mut v = batch.to_vec();
        v.sort_unstable();
        let wrap = v[0] + n - v[v.len() - 1];
        let gap = v.windows(2).map(|w| w[1] - w[0]).chain([wrap]).max().unwrap_or(0);
        n - gap + 1
    }

    #[test]
    fn local_batches_come_from_one_stretch_and_still_cover_the_epoch() {
        let (n, batch) = (5003, 8);
        let window = batch * BUCKET_BATCHES;
        let lens = |i: usize| Ok(i % 13);
        let order = EpochOrder::new(n, batch, 4).local(true);
        let batches: Vec<Vec<usize>> = (0..order.len()).map(|j| order.batch(j, &lens).unwrap()).collect();
        assert!(batches.iter().all(|b| b.len() == batch));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), order.len() * batch, "batches share no pair");
        assert!(batches.iter().all(|b| circular_span(b, n) <= window), "every batch within {window} consecutive pairs");
        // The global order spreads a batch over the corpus; another seed moves the windows.
        let global = EpochOrder::new(n, batch, 4);
        let spread = (0..global.len()).filter(|&j| circular_span(&global.batch(j, &lens).unwrap(), n) > window).count();
        assert!(spread > global.len() * 9 / 10, "{spread} of {} global batches spread", global.len());
        let other = EpochOrder::new(n, batch, 5).local(true);
        assert_ne!(other.batch(0, &lens).unwrap(), batches[0]);
        assert_eq!(EpochOrder::new(n, batch, 4).local(true).batch(7, &lens).unwrap(), batches[7]);
    }
}
