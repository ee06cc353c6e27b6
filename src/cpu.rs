//! CPU math shared by the fused kernels and the optimizer: a branch-free `exp` and `erf`,
//! lane-split reductions, the `kernel!` macro (each slice kernel compiled for the baseline
//! target and for AVX2 + FMA, picked at run time), parallel row helpers with a fixed
//! combination order, and a small strided GEMM. Nothing here knows about tensors' graphs.

use candle_core::{bail, CpuStorage, Layout, Result};
use rayon::prelude::*;

/// Elements per parallel work item for elementwise kernels: big enough to amortise rayon.
pub(crate) const CHUNK: usize = 1 << 14;

/// The f32 data of a contiguous CPU tensor's storage.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("{op}: input is not contiguous"),
    }
}

/// The f32 data of a contiguous CPU storage.
pub(crate) fn storage_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else { bail!("expected a CPU tensor") };
    f32s(cpu, layout, "fused op")
}

/// `f` on the f32 data of a contiguous CPU tensor, in place: the tensor's clones (which share
/// its storage) see the change. For buffers that are owned by one step, such as gradients.
pub(crate) fn with_f32s_mut<T>(t: &candle_core::Tensor, f: impl FnOnce(&mut [f32]) -> T) -> Result<T> {
    struct InPlace<F, T> {
        f: std::cell::RefCell<Option<F>>,
        out: std::cell::RefCell<Option<T>>,
    }
    impl<F: FnOnce(&mut [f32]) -> T, T> candle_core::InplaceOp1 for InPlace<F, T> {
        fn name(&self) -> &'static str {
            "in-place f32"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let (CpuStorage::F32(data), Some((a, b))) = (s, l.contiguous_offsets()) else {
                bail!("in place: expected a contiguous f32 tensor")
            };
            let f = self.f.borrow_mut().take().expect("an in-place op runs once");
            *self.out.borrow_mut() = Some(f(&mut data[a..b]));
            Ok(())
        }
    }
    let op = InPlace { f: std::cell::RefCell::new(Some(f)), out: std::cell::RefCell::new(None) };
    t.inplace_op1(&op)?;
    op.out.into_inner().ok_or_else(|| candle_core::Error::Msg("in place: the op did not run".into()))
}

/// Rows of `out` (each `d` wide) in parallel, in chunks of whole rows.
pub(crate) fn par_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / d.max(1);
    let per = (CHUNK / d.max(1)).clamp(1, rows.div_ceil(2 * rayon::current_num_threads()).max(1));
    out.par_chunks_mut(per * d).enumerate().for_each(|(c, chunk)| {
        for (j, row) in chunk.chunks_mut(d).enumerate() {
            f(c * per + j, row)
        }
    });
}

/// `exp` to a few ulp, branch-free so that it vectorises (std's `exp` is a libm call).
/// Below -87 it returns exactly 0, as masked attention needs.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5 * 2^23 trick (no SSE4.1 `round` needed); the rounded
    // integer also sits in the low bits of `m`, which avoids a float-to-int conversion
    // (Rust's saturating `as i32` does not vectorise).
    let m = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = m - 12_582_912.0;
    // x - n ln2 in two parts (Cody & Waite), so that large |x| keep their precision.
    let f = (x - n * 0.693_359_4) + n * 2.121_944_4e-4; // |f| <= ln2 / 2
                                                        // Taylor series of e^f to degree 7: relative error below 1e-8 on that interval.
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let k = m.to_bits().wrapping_sub(0x4B40_0000); // n, two's complement
    let y = p * f32::from_bits(k.wrapping_add(127) << 23);
    if underflow {
        0.0
    } else {
        y
    }
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, under f32's own).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// Lanes for reductions: f32 sums are not reassociated by the compiler, so a plain `sum()`
/// is one serial chain. Eight (or sixteen) independent partial sums vectorise.
pub(crate) const LANES: usize = 16;

/// `sum_i f(a_i, b_i)` in `LANES` independent partial sums.
#[inline(always)]
pub(crate) fn reduce2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum::<f32>()
}

#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    reduce2(a, a, |x, _| x)
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce2(a, b, |x, y| x * y)
}

#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(x[j]);
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

pub(crate) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
pub(crate) const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Whether this CPU runs the AVX2 + FMA builds of the kernels below.
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the AVX-512 builds of the kernels below (F, BW, VL, and AVX2 + FMA).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            avx2_fma()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A slice kernel compiled three times: for the baseline target (x86-64 means SSE2, 4 lanes),
/// for AVX2 + FMA (8 lanes) and for AVX-512 (16 lanes), picked at run time. Each build does
/// the same float operations in the same order (Rust never contracts or reassociates them),
/// so all three give the same bits. The bodies are written branch-free so that
/// LLVM vectorises them.
macro_rules! kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
                fn widest($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if $crate::cpu::avx512() {
                    // SAFETY: the CPU has these features (checked just above).
                    return unsafe { widest($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if $crate::cpu::avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use kernel;

kernel! {
    /// `acc[j] += sum_r g[r][j]` over the rows of `g`.
    fn add_column_sums(g: &[f32], acc: &mut [f32]) {
        for row in g.chunks_exact(acc.len()) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// Column sums of a row-major [rows, cols] matrix, rows split across threads. The partial
/// sums are combined in chunk order (not in rayon's scheduling order), so the result is the
/// same on any number of threads and same-seed runs stay bit-identical.
pub(crate) fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    let per = (CHUNK / cols.max(1)).max(1);
    let partials: Vec<Vec<f32>> = g
        .par_chunks(per * cols)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            add_column_sums(chunk, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; cols];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(x, y)| *x += y);
    }
    total
}

/// `c = a · b` for small strided matrices on this thread (`rs`/`cs`: row and column strides),
/// [m, k] x [k, n] -> [m, n] with `c` rows `c_rs` apart. Heads and transposes are just strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_small(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    let ((a, a_rs, a_cs), (b, b_rs, b_cs)) = (a, b);
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0, "gemm_small: empty matrix");
    assert!(last(m, a_rs, k, a_cs) < a.len() && last(k, b_rs, n, b_cs) < b.len() && last(m, c_rs, n, 1) < c.len());
    // SAFETY: the asserts above keep every strided access inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `vec![0; n]` (any number type), zeroed by all threads. With mimalloc a reused block is zeroed by the
/// calling thread alone, and the buffers of a training step (up to 25 MB) are reused blocks:
/// serial zero fills were a tenth of a bf16 step, the other core idle.
pub(crate) fn par_zeroed<T: Copy + Default + Send>(n: usize) -> Vec<T> {
    par_blocks(n, CHUNK, |_, _| {})
}

/// `n` values (zero where not written) that `fill(start, block)` writes, in parallel blocks of `block` values (the last
/// may be shorter). Each block is zeroed just before, by the thread that fills it and while it
/// is in cache: a zeroed allocation would first pass over all of it, from one thread.
pub(crate) fn par_blocks<T: Copy + Default + Send>(
    n: usize,
    block: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let zero_then_fill = |start: usize, b: &mut [std::mem::MaybeUninit<T>]| {
        b.iter_mut().for_each(|v| {
            v.write(T::default());
        });
        // SAFETY: every value of `b` was written just above.
        fill(start, unsafe { &mut *(b as *mut [std::mem::MaybeUninit<T>] as *mut [T]) })
    };
    // SAFETY: `zero_then_fill` writes every value of each block.
    unsafe { par_written(n, block, zero_then_fill) }
}

/// `n` values that `fill(start, block)` writes, in parallel blocks of `block` values (the last
/// may be shorter), with no zero fill first.
///
/// # Safety
/// `fill` must write every value of each block it is given.
pub(crate) unsafe fn par_written<T: Send>(
    n: usize,
    block: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut().par_chunks_mut(block.max(1)).enumerate().for_each(|(i, b)| fill(i * block, b));
    // SAFETY: the capacity holds n values, and `fill` wrote all of them (the caller's promise).
    unsafe { out.set_len(n) };
    out
}

pub(crate) fn map_chunks(x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    par_blocks(x.len(), CHUNK, |s, o| f(&x[s..s + o.len()], o))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column sums combine per-chunk partials in chunk order: bit-identical to a sequential
    /// chunk-by-chunk sum on any number of threads (rayon's own reduce order depends on
    /// scheduling, which made same-seed runs differ on 2 threads).
    #[test]
    fn column_sums_are_the_same_on_any_thread_count() {
        let cols = 48;
        let rows = 5 * CHUNK / cols + 7; // six chunks, the last one partial
        let g: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 + 1e-7 * i as f32).collect();
        let per = CHUNK / cols;
        let mut expected = vec![0f32; cols];
        for chunk in g.chunks(per * cols) {
            let mut acc = vec![0f32; cols];
            for row in chunk.chunks_exact(cols) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            expected.iter_mut().zip(acc).for_each(|(e, a)| *e += a);
        }
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for _ in 0..3 {
                let got = pool.install(|| column_sums(&g, cols));
                assert!(got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads");
            }
        }
    }

    #[test]
    fn fast_exp_and_erf_match_std() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.04;
            let (e, want) = (exp(x), x.exp());
            assert!((e - want).abs() <= 4e-7 * want, "exp({x}) = {e}, want {want}");
            let want = libm::erff(x);
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}) = {}, want {want}", erf(x));
        }
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(-1e4), 0.0);
    }
}
