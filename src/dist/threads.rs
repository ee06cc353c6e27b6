//! Ranks as threads of one process, exchanging through shared memory: the collectives'
//! semantics without a launcher, so the data-parallel arithmetic is tested in every build.

use std::sync::{Arc, Condvar, Mutex};

use super::Collective;
use crate::error::{Error, Result};

/// What the ranks of one world share: each rank's contribution to the current collective and a
/// generation counter that advances when every rank has contributed.
struct Shared {
    size: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

#[derive(Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<u8>>>,
    /// The finished round's contributions, read by every rank before the next round starts.
    done: Vec<Vec<u8>>,
    readers: usize,
}

/// One rank of a world of threads.
pub struct Threads {
    rank: usize,
    shared: Arc<Shared>,
}

impl Threads {
    /// `size` connected ranks, one handle each (move each into its own thread).
    pub fn world(size: usize) -> Vec<Threads> {
        let round = Round { slots: vec![None; size], ..Round::default() };
        let shared = Arc::new(Shared { size, state: Mutex::new(round), turn: Condvar::new() });
        (0..size).map(|rank| Threads { rank, shared: shared.clone() }).collect()
    }

    /// Contribute `bytes`; every rank's contributions of this round, in rank order.
    fn exchange(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let poisoned = |_| Error::invalid("a rank thread panicked");
        let mut s = self.shared.state.lock().map_err(poisoned)?;
        // Wait until the previous round's results have been read by every rank.
        while s.readers > 0 {
            s = self.shared.turn.wait(s).map_err(poisoned)?;
        }
        let generation = s.generation;
        s.slots[self.rank] = Some(bytes);
        if s.slots.iter().all(Option::is_some) {
            s.done = s.slots.iter_mut().map(|x| x.take().unwrap_or_default()).collect();
            s.readers = self.shared.size;
            s.generation += 1;
            self.shared.turn.notify_all();
        }
        while s.generation == generation {
            s = self.shared.turn.wait(s).map_err(poisoned)?;
        }
        let out = s.done.clone();
        s.readers -= 1;
        if s.readers == 0 {
            self.shared.turn.notify_all();
        }
        Ok(out)
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn to_f32(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(self.exchange(to_bytes(local))?.iter().flat_map(|b| to_f32(b)).collect())
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(to_bytes(buf))?;
        buf.iter_mut().for_each(|x| *x = 0.0);
        // Rank order, as MPI's reduction of two ranks: the same sum on every rank.
        for b in &all {
            buf.iter_mut().zip(to_f32(b)).for_each(|(x, y)| *x += y);
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8]) -> Result<()> {
        let all = self.exchange(buf.to_vec())?;
        buf.copy_from_slice(&all[0][..buf.len()]);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Vec::new()).map(|_| ())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_agree_on_every_rank() {
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
            let handles: Vec<_> = Threads::world(3)
                .into_iter()
                .map(|t| {
                    s.spawn(move || {
                        let r = t.rank() as f32;
                        let gathered = t.all_gather(&[r, 10.0 + r]).unwrap();
                        let mut sum = vec![r, 1.0];
                        t.all_reduce_sum(&mut sum).unwrap();
                        let mut b = vec![t.rank() as u8; 2];
                        t.broadcast(&mut b).unwrap();
                        t.barrier().unwrap();
                        (gathered, sum, b)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (gathered, sum, b) in results {
            assert_eq!(gathered, [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
            assert_eq!(sum, [3.0, 3.0]);
            assert_eq!(b, [0, 0]);
        }
    }

    /// The summed gradients equal the dense sum, for small matrices (packed together; two of
    /// them views of one buffer), a large one (summed in place), and a vocabulary-sized one
    /// sent as its non-zero rows (different rows on each rank, none at all on rank 2), and a
    /// parameter no rank has a gradient for.
    #[test]
    fn all_reduce_grads_is_the_dense_sum() {
        use candle_core::{Device, Tensor, Var};
        let rows = crate::dist::SPARSE_ROWS + 5;
        let params: Vec<(String, Var)> = [
            ("small", (3, 2)),
            ("vocab", (rows, 2)),
            ("unused", (rows, 2)),
            ("big", (300, 256)),
            ("a", (4, 1)),
            ("b", (2, 3)),
        ]
        .into_iter()
        .map(|(n, shape)| (n.to_string(), Var::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap()))
        .collect();
        // Rank k's gradient of "vocab": row 7 k and row 1 set (rank 2: none); of "small": k.
        let grad = |k: usize| -> (Tensor, Option<Tensor>) {
            let small = Tensor::full(k as f32, (3, 2), &Device::Cpu).unwrap();
            let mut v = vec![0f32; rows * 2];
            if k < 2 {
                v[2 * (7 * k + 2)] = 1.5 + k as f32;
                v[2 + 1] = -(k as f32) - 0.25;
            }
            if k == 1 {
                // A NaN in a row's second column only: the row must still be sent.
                v[2 * 20 + 1] = f32::NAN;
            }
            (small, (k < 2).then(|| Tensor::from_vec(v, (rows, 2), &Device::Cpu).unwrap()))
        };
        let sums: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = Threads::world(3)
                .into_iter()
                .enumerate()
                .map(|(k, t)| {
                    let params = &params;
                    s.spawn(move || {
                        let world = crate::dist::World::new(Box::new(t));
                        let mut store = Var::new(0f32, &Device::Cpu).unwrap().as_tensor().backward().unwrap();
                        let (small, vocab) = grad(k);
                        store.insert(params[0].1.as_tensor(), small);
                        if let Some(v) = vocab {
                            store.insert(params[1].1.as_tensor(), v);
                        }
                        let big = Tensor::full(k as f32 + 0.5, (300, 256), &Device::Cpu).unwrap();
                        store.insert(params[3].1.as_tensor(), big);
                        // "a" and "b" share one buffer, as views of it.
                        let shared = Tensor::arange(0f32, 10.0, &Device::Cpu).unwrap().affine(1.0, k as f64).unwrap();
                        store.insert(params[4].1.as_tensor(), shared.narrow(0, 0, 4).unwrap().reshape((4, 1)).unwrap());
                        store.insert(params[5].1.as_tensor(), shared.narrow(0, 4, 6).unwrap().reshape((2, 3)).unwrap());
                        let out = world.all_reduce_grads(params, store).unwrap();
                        let flat = |i: usize| {
                            out.get(params[i].1.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                        };
                        (0..6).map(flat).collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut vocab = vec![0f32; rows * 2];
        vocab[2 * 2] = 1.5;
        vocab[2 * 9] = 2.5;
        vocab[3] = -0.25 - 1.25;
        for got in sums {
            assert_eq!(got[0], vec![3.0; 6]);
            assert!(got[1][2 * 20 + 1].is_nan(), "the NaN reaches every rank");
            let rest: Vec<f32> = got[1].iter().enumerate().filter(|(i, _)| *i != 2 * 20 + 1).map(|(_, v)| *v).collect();
            let want: Vec<f32> = vocab.iter().enumerate().filter(|(i, _)| *i != 2 * 20 + 1).map(|(_, v)| *v).collect();
            assert_eq!(rest, want);
            assert_eq!(got[2], vec![0.0; rows * 2]);
            assert_eq!(got[3], vec![4.5; 300 * 256]);
            let shared: Vec<f32> = (0..10).map(|i| 3.0 * i as f32 + 3.0).collect();
            assert_eq!([got[4].clone(), got[5].clone()].concat(), shared);
        }
    }
}
