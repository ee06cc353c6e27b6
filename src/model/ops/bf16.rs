//! Matrix products in bf16 for training on the CPU (`train.dtype = "bf16"`): both factors
//! rounded to bf16 (to nearest even), pairs of products summed in f32 by AVX-512 BF16
//! (`vdpbf16ps`: 32 multiply-adds an instruction, twice an f32 FMA's). Master weights, AdamW,
//! layer norm, softmax, attention and the loss stay f32, as on the GPU path. On CPUs with AMX
//! the same packed pairs go through tiles instead ([`super::amx`]).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// f32 sums per register.
const LANES: usize = 16;
/// A register tile: `ROWS` rows of A x `PANELS` panels of 16 columns of B.
const ROWS: usize = 8;
const PANELS: usize = 3;
/// Rows of A a block: their pairs stay in L1 while every panel of B passes.
const BLOCK: usize = 64;

/// Whether this CPU has AVX-512 BF16 (with F, BW and VL), checked at run time.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One product at a time, in the order `vdpbf16ps` adds them (the reference).
    Portable,
    /// AVX-512 BF16: the portable bits, 16 columns an instruction.
    Avx512,
    /// AMX tiles: 16 x 16 outputs an instruction; the same products and f32 sums, with
    /// denormals flushed to zero and each pair's two products possibly added in the other order.
    Amx,
}

impl Path {
    /// The fastest this CPU has.
    pub fn best() -> Self {
        if super::amx::available() {
            Path::Amx
        } else if supported() {
            Path::Avx512
        } else {
            Path::Portable
        }
    }
}

/// A strided f32 matrix: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    #[inline]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }

    fn check(&self, what: &str) -> Result<()> {
        let last = (self.rows.max(1) - 1) * self.rs + (self.cols.max(1) - 1) * self.cs;
        if self.rows > 0 && self.cols > 0 && last >= self.data.len() {
            bail!("bf16 gemm: {what} [{}, {}] reaches past its {} values", self.rows, self.cols, self.data.len())
        }
        Ok(())
    }
}

/// f32 to bf16 bits, rounded to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// bf16 bits back to f32 (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two bf16 in one u32, as `vdpbf16ps` pairs them: `lo` in the low half.
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// A [m, k] as `rows` (at least m; the rest zero) of `k2` pairs (k padded with zeros). Sixteen
/// rows at a time, pair by pair: a transposed view (the gradient of a weight reads Gᵀ) then
/// reads along its rows too. `vector`: AVX-512 BF16 conversions for the two layouts products
/// take (row-major, transposed); the same bits but for denormals, which they flush to zero.
fn pack_a(a: &View, k2: usize, rows: usize, vector: bool) -> Vec<u32> {
    let groups = k2.min(a.cols.div_ceil(2));
    let fill = |start: usize, chunk: &mut [MaybeUninit<u32>]| {
        let i0 = start / k2.max(1);
        let n = (chunk.len() / k2.max(1)).min(a.rows.saturating_sub(i0));
        // The padding first: pairs past the columns, rows past A's.
        for (ii, row) in chunk.chunks_exact_mut(k2).enumerate() {
            let from = if ii < n { groups } else { 0 };
            row[from..].iter_mut().for_each(|v| {
                v.write(0);
            });
        }
        #[cfg(target_arch = "x86_64")]
        if vector && a.cs == 1 {
            for (ii, dst) in chunk.chunks_exact_mut(k2).take(n).enumerate() {
                let row = &a.data[(i0 + ii) * a.rs..][..a.cols];
                // SAFETY: AVX-512 BF16 is there (`vector`); `dst` holds k2 >= cols / 2 pairs.
                unsafe { avx512::pairs_of_row(row, dst.as_mut_ptr() as *mut u32) };
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if vector && a.rs == 1 && n == LANES {
            // Rows 2g and 2g + 1 of the data hold pair g of 16 consecutive rows of A. Sixteen
            // pairs at a time, so each of the 16 rows gets a whole cache line: one pair per row
            // at a time strides the rows' k2 pairs apart (8 KB for a weight gradient over 4096
            // tokens), and those stores fell in the same few cache sets.
            let mut block = [[0u32; LANES]; LANES];
            for g0 in (0..groups).step_by(LANES) {
                let gn = (groups - g0).min(LANES);
                for (gi, group) in block.iter_mut().enumerate().take(gn) {
                    let g = g0 + gi;
                    let lo = &a.data[2 * g * a.cs + i0..][..LANES];
                    let hi = (2 * g + 1 < a.cols).then(|| &a.data[(2 * g + 1) * a.cs + i0..][..LANES]);
                    // SAFETY: AVX-512 BF16 is there (`vector`); both rows hold 16 values.
                    unsafe { avx512::pairs_of_rows(lo, hi, group.as_mut_ptr()) };
                }
                for (ii, dst) in chunk.chunks_exact_mut(k2).enumerate() {
                    for (gi, d) in dst[g0..g0 + gn].iter_mut().enumerate() {
                        d.write(block[gi][ii]);
                    }
                }
            }
            return;
        }
        for g in 0..groups {
            for ii in 0..n {
                let hi = if 2 * g + 1 < a.cols { a.at(i0 + ii, 2 * g + 1) } else { 0.0 };
                chunk[ii * k2 + g].write(pair(a.at(i0 + ii, 2 * g), hi));
            }
        }
    };
    // SAFETY: `fill` zeroes every pair past `groups` and every row past A's, and each path
    // writes pairs 0..groups of A's rows.
    unsafe { crate::cpu::par_written(rows * k2, (LANES * k2).max(1), fill) }
}

/// B [k, n] as panels of 16 columns, each `k2` groups of 16 pairs (rows 2g and 2g + 1 of a
/// column): [panels][k2][16]. Columns past n, rows past k and panels past n's are zero.
/// `vector` as in [`pack_a`].
fn pack_b(b: &View, k2: usize, panels: usize, vector: bool) -> Vec<u32> {
    let groups = b.rows.div_ceil(2).min(k2);
    let fill = |start: usize, panel: &mut [MaybeUninit<u32>]| {
        let j0 = start / k2.max(1);
        let full = j0 + LANES <= b.cols;
        // The padding first: groups past B's rows.
        panel[groups * LANES..].iter_mut().for_each(|v| {
            v.write(0);
        });
        #[cfg(target_arch = "x86_64")]
        if vector && full && b.cs == 1 {
            for (g, group) in panel.chunks_exact_mut(LANES).enumerate().take(groups) {
                let lo = &b.data[2 * g * b.rs + j0..][..LANES];
                let hi = (2 * g + 1 < b.rows).then(|| &b.data[(2 * g + 1) * b.rs + j0..][..LANES]);
                // SAFETY: AVX-512 BF16 is there (`vector`); both rows hold 16 values, and
                // `group` 16 pairs.
                unsafe { avx512::pairs_of_rows(lo, hi, group.as_mut_ptr() as *mut u32) };
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if vector && full && b.rs == 1 {
            // A weight read transposed: column j of B is row j of the data, its pairs in order.
            let pairs = b.rows.div_ceil(2);
            let mut rows = vec![0u32; LANES * pairs];
            for (lane, dst) in rows.chunks_exact_mut(pairs.max(1)).enumerate() {
                // SAFETY: AVX-512 BF16 is there (`vector`); `dst` holds rows / 2 pairs.
                unsafe { avx512::pairs_of_row(&b.data[(j0 + lane) * b.cs..][..b.rows], dst.as_mut_ptr()) };
            }
            for (g, group) in panel.chunks_exact_mut(LANES).enumerate().take(groups) {
                for (lane, v) in group.iter_mut().enumerate() {
                    v.write(rows[lane * pairs + g]);
                }
            }
            return;
        }
        for (g, group) in panel.chunks_exact_mut(LANES).enumerate().take(groups) {
            for (lane, v) in group.iter_mut().enumerate() {
                let j = j0 + lane;
                let hi = if 2 * g + 1 < b.rows && j < b.cols { b.at(2 * g + 1, j) } else { 0.0 };
                v.write(if j < b.cols { pair(b.at(2 * g, j), hi) } else { 0 });
            }
        }
    };
    // SAFETY: `fill` zeroes every group past `groups`, and each path writes all 16 pairs of
    // groups 0..groups (columns past B's as zero).
    unsafe { crate::cpu::par_written(panels * k2 * LANES, (k2 * LANES).max(1), fill) }
}

/// `c` [a.rows, b.cols] (row-major) = `bias` (per column; zeros without one) + a · b, with a
/// and b rounded to bf16 and the products summed in f32, by the kernel `path` (which the CPU
/// must have).
pub fn gemm(a: View, b: View, bias: Option<&[f32]>, path: Path) -> Result<Vec<f32>> {
    a.check("A")?;
    b.check("B")?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || bias.is_some_and(|v| v.len() != n) {
        bail!("bf16 gemm: [{m}, {k}] x [{}, {n}] with a bias of {:?}", b.rows, bias.map(<[f32]>::len))
    }
    let amx = path == Path::Amx;
    if amx && !super::amx::available() || path == Path::Avx512 && !supported() {
        bail!("bf16 gemm: the {path:?} kernel asked for on a CPU without it")
    }
    // Tiles take 16 pairs and 16 rows at a time: both padded with zeros.
    let tile = super::amx::TILE;
    let k2 = if amx { k.div_ceil(2 * tile) * tile } else { k.div_ceil(2) };
    let panels = n.div_ceil(LANES);
    let a_rows = if amx { m.div_ceil(tile) * tile } else { m };
    let vector = path != Path::Portable && supported();
    let (pa, pb) = (pack_a(&a, k2, a_rows, vector), pack_b(&b, k2, panels, vector));
    let mut init = vec![0f32; panels * LANES];
    if let Some(bias) = bias {
        init[..n].copy_from_slice(bias);
    }
    let packed = Packed { a: &pa, b: &pb, k2, n, init: &init };
    // Blocks of 64 rows (a multiple of the AMX kernel's 32 and of the AVX-512 kernel's
    // blocks), each written whole by the kernel: no zero fill first.
    let mut c = Vec::<f32>::with_capacity(m * n);
    c.spare_capacity_mut().par_chunks_mut((BLOCK * n).max(1)).enumerate().for_each(|(i, chunk)| {
        let (r0, rows) = (i * BLOCK, chunk.len() / n.max(1));
        let out = chunk.as_mut_ptr() as *mut f32;
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX is available (checked above); A has `a_rows` rows of `k2` pairs, a
            // multiple of 16; the block starts at a multiple of 64 rows; `out` holds its
            // rows x n values.
            Path::Amx => unsafe { super::amx::bf16_rows(&pa, &pb, k2, &init, n, r0, rows, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has the features (checked above); the kernel reads rows
            // r0..r0 + rows of the packed A, all of the packed B, and writes the block's
            // rows x n values.
            Path::Avx512 => unsafe { avx512::rows(&packed, r0, rows, out) },
            _ => packed.rows_portable(r0, rows, chunk),
        }
    });
    // SAFETY: every kernel stores each of its rows x n outputs, so all m x n are written.
    unsafe { c.set_len(m * n) };
    Ok(c)
}

/// Both factors packed, for the kernels.
struct Packed<'a> {
    a: &'a [u32],
    b: &'a [u32],
    k2: usize,
    n: usize,
    /// Each column's starting value (the bias, or 0), padded to whole panels.
    init: &'a [f32],
}

impl Packed<'_> {
    /// `vdpbf16ps`'s arithmetic per output: for each pair, the odd product then the even one
    /// added (bf16 products are exact in f32, so each step rounds once).
    fn rows_portable(&self, r0: usize, rows: usize, out: &mut [std::mem::MaybeUninit<f32>]) {
        for (i, y) in out.chunks_exact_mut(self.n).enumerate().take(rows) {
            let a = &self.a[(r0 + i) * self.k2..(r0 + i + 1) * self.k2];
            for (j, y) in y.iter_mut().enumerate() {
                let (panel, lane) = (j / LANES, j % LANES);
                let mut acc = self.init[j];
                for (g, &pa) in a.iter().enumerate() {
                    let pb = self.b[(panel * self.k2 + g) * LANES + lane];
                    acc += from_bf16((pa >> 16) as u16) * from_bf16((pb >> 16) as u16);
                    acc += from_bf16(pa as u16) * from_bf16(pb as u16);
                }
                y.write(acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Packed, BLOCK, LANES, PANELS, ROWS};
    use std::arch::x86_64::*;

    /// `row`'s values as bf16 pairs in order (the lower half first), a zero after an odd last
    /// one: `dst[g]` = (row[2g], row[2g + 1]). Rounded to nearest even, as [`super::to_bf16`]
    /// (denormals flushed to zero). `dst` must be valid for writes of `row.len() / 2` pairs
    /// (rounded up); it may be uninitialised.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pairs_of_row(row: &[f32], dst: *mut u32) {
        let n = row.len();
        let mut i = 0;
        while i < n {
            let m = (n - i).min(LANES);
            let mask: __mmask16 = if m == LANES { 0xFFFF } else { (1u16 << m) - 1 };
            let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row.as_ptr().add(i)));
            let bytes: __m256i = std::mem::transmute(v);
            // m values make m.div_ceil(2) pairs: 2 bytes a value.
            let words = m.div_ceil(2);
            let store: __mmask8 = if words == 8 { 0xFF } else { (1u16 << words) as u8 - 1 };
            _mm256_mask_storeu_epi32(dst.add(i / 2) as *mut _, store, bytes);
            i += LANES;
        }
    }

    /// 16 pairs from two rows of 16 values: `dst[l]` = (lo[l], hi[l]), hi zero when None.
    /// `dst` must be valid for writes of 16 pairs; it may be uninitialised.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pairs_of_rows(lo: &[f32], hi: Option<&[f32]>, dst: *mut u32) {
        let l = _mm512_loadu_ps(lo.as_ptr());
        let h = hi.map_or(_mm512_setzero_ps(), |h| _mm512_loadu_ps(h.as_ptr()));
        // [lo 0..15, hi 0..15] as 32 bf16, then interleaved: lo0 hi0 lo1 hi1 ...
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi16(idx, both));
    }

    /// Rows r0..r0 + rows of C into `out` (those rows, row-major), a block of rows at a time;
    /// every output is stored and none read, so `out` may be uninitialised.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn rows(p: &Packed, r0: usize, rows: usize, out: *mut f32) {
        let panels = p.init.len() / LANES;
        for b0 in (0..rows).step_by(BLOCK) {
            let bn = (rows - b0).min(BLOCK);
            let mut q = 0;
            while q < panels {
                let c = (panels - q).min(PANELS);
                let mut r = b0;
                while r < b0 + bn {
                    let m = (b0 + bn - r).min(ROWS);
                    let (a, o) = (p.a.as_ptr().add((r0 + r) * p.k2), out.add(r * p.n));
                    match m {
                        8 => tile_c::<8>(p, q, c, a, o),
                        7 => tile_c::<7>(p, q, c, a, o),
                        6 => tile_c::<6>(p, q, c, a, o),
                        5 => tile_c::<5>(p, q, c, a, o),
                        4 => tile_c::<4>(p, q, c, a, o),
                        3 => tile_c::<3>(p, q, c, a, o),
                        2 => tile_c::<2>(p, q, c, a, o),
                        _ => tile_c::<1>(p, q, c, a, o),
                    }
                    r += m;
                }
                q += c;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn tile_c<const R: usize>(p: &Packed, q: usize, c: usize, a: *const u32, out: *mut f32) {
        match c {
            3 => tile::<R, 3>(p, q, a, out),
            2 => tile::<R, 2>(p, q, a, out),
            _ => tile::<R, 1>(p, q, a, out),
        }
    }

    /// R rows x C panels from panel `q0`: sums in registers over all pairs, then stored
    /// (masked past the last column).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize>(p: &Packed, q0: usize, a: *const u32, out: *mut f32) {
        let k2 = p.k2;
        let bp = p.b.as_ptr().add(q0 * k2 * LANES);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for (c, init) in acc[0].iter_mut().enumerate() {
            *init = _mm512_loadu_ps(p.init.as_ptr().add((q0 + c) * LANES));
        }
        for r in 1..R {
            acc[r] = acc[0];
        }
        for g in 0..k2 {
            let mut bv = [_mm512_setzero_si512(); C];
            for (c, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(bp.add((c * k2 + g) * LANES) as *const _);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * k2 + g) as i32));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbf16_ps(*acc, av, std::mem::transmute::<__m512i, __m512bh>(bv));
                }
            }
        }
        for c in 0..C {
            let j = (q0 + c) * LANES;
            let valid = (p.n - j).min(LANES);
            let mask: __mmask16 = if valid == LANES { 0xFFFF } else { (1u16 << valid) - 1 };
            for (r, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add(r * p.n + j), mask, acc[c]);
            }
        }
    }
}

/// `a · b` (or `aᵀ · b` with `transpose_a`) of two contiguous 2-d f32 tensors, in bf16 with f32
/// sums: the products of a linear layer's backward pass. No backward of its own.
pub fn matmul(a: &Tensor, b: &Tensor, transpose_a: bool) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Matmul { transpose_a })
}

struct Matmul {
    transpose_a: bool,
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (super::f32s(s1, l1, self.name())?, super::f32s(s2, l2, self.name())?);
        let ((ar, ac), (br, bc)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let a = match self.transpose_a {
            false => View { data: a, rows: ar, cols: ac, rs: ac, cs: 1 },
            true => View { data: a, rows: ac, cols: ar, rs: 1, cs: ac },
        };
        let c = gemm(a, View { data: b, rows: br, cols: bc, rs: bc, cs: 1 }, None, Path::best())?;
        Ok((CpuStorage::F32(c), Shape::from((a.rows, bc))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82, "the other tie rounds up to even");
        assert_eq!(to_bf16(-2.5), 0xC020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Shapes with odd k (a zero-padded pair), partial panels and tiles, several row blocks.
    const SHAPES: [(usize, usize, usize); 5] =
        [(1, 1, 1), (3, 5, 17), (9, 37, 50), (2 * BLOCK + 3, 64, 48), (20, 130, 7)];

    #[test]
    fn avx512_kernel_gives_the_portable_bits() {
        if !supported() {
            eprintln!("note: this CPU has no AVX-512 BF16; the kernel is not checked");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        for (m, k, n) in SHAPES {
            let (a, b, bias) = (random(m * k, &mut rng), random(k * n, &mut rng), random(n, &mut rng));
            let (va, vb) =
                (View { data: &a, rows: m, cols: k, rs: k, cs: 1 }, View { data: &b, rows: k, cols: n, rs: n, cs: 1 });
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(
                bits(gemm(va, vb, Some(&bias), Path::Avx512).unwrap()),
                bits(gemm(va, vb, Some(&bias), Path::Portable).unwrap()),
                "{m}x{k}x{n}"
            );
        }
    }

    /// The AVX-512 packs give the scalar packs' bits (ties to even included) in the layouts
    /// they take: row-major and transposed A, row-major and transposed B, odd sizes.
    #[test]
    fn vector_packs_give_the_scalar_bits() {
        if !supported() {
            eprintln!("note: this CPU has no AVX-512 BF16; the vector packs are not checked");
            return;
        }
        let mut rng = StdRng::seed_from_u64(8);
        for (r, c) in [(16, 16), (32, 37), (48, 5), (33, 64), (80, 32)] {
            let mut data = random(r * c, &mut rng);
            // Exact ties between two bf16 values: the even one must win.
            data[0] = 1.0 + 1.0 / 256.0;
            data[1] = 1.0 + 3.0 / 256.0;
            let views = [
                View { data: &data, rows: r, cols: c, rs: c, cs: 1 },
                View { data: &data, rows: c, cols: r, rs: 1, cs: c },
            ];
            for v in views {
                let (k2, rows) = (v.cols.div_ceil(2) + 3, v.rows.div_ceil(16) * 16);
                assert_eq!(pack_a(&v, k2, rows, true), pack_a(&v, k2, rows, false), "A {r}x{c} {v:?}");
                let (k2, panels) = (v.rows.div_ceil(2) + 1, v.cols.div_ceil(LANES));
                assert_eq!(pack_b(&v, k2, panels, true), pack_b(&v, k2, panels, false), "B {r}x{c}");
            }
        }
    }

    /// AMX tiles against the portable kernel: the same bf16 products summed in f32, so within
    /// a few roundings of the sum of their sizes (the order inside a pair may differ); shapes
    /// with partial tiles in every direction, odd panel counts and several row blocks.
    #[test]
    fn amx_tiles_agree_with_the_portable_kernel() {
        if !crate::model::ops::amx::available() {
            eprintln!("note: this CPU (or process) has no AMX; the tile kernel is not checked");
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for (m, k, n) in SHAPES.into_iter().chain([(70, 300, 33), (97, 33, 80)]) {
            let (a, b, bias) = (random(m * k, &mut rng), random(k * n, &mut rng), random(n, &mut rng));
            let (va, vb) =
                (View { data: &a, rows: m, cols: k, rs: k, cs: 1 }, View { data: &b, rows: k, cols: n, rs: n, cs: 1 });
            let tiles = gemm(va, vb, Some(&bias), Path::Amx).unwrap();
            let reference = gemm(va, vb, Some(&bias), Path::Portable).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let size: f32 = bias[j].abs() + (0..k).map(|l| (a[i * k + l] * b[l * n + j]).abs()).sum::<f32>();
                    let (x, y) = (tiles[i * n + j], reference[i * n + j]);
                    assert!((x - y).abs() <= 1e-6 * size, "[{i}, {j}] of {m}x{k}x{n}: {x} vs {y}");
                }
            }
        }
    }

    /// Within bf16's rounding of both factors (relative 2^-8 each) plus f32 summation, of an f64
    /// product; transposed views read the same matrix.
    #[test]
    fn products_are_within_bf16_rounding_of_f64() {
        let mut rng = StdRng::seed_from_u64(6);
        for (m, k, n) in SHAPES {
            let (a, b) = (random(m * k, &mut rng), random(k * n, &mut rng));
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [k, m]
            let vb = View { data: &b, rows: k, cols: n, rs: n, cs: 1 };
            let c = gemm(View { data: &a, rows: m, cols: k, rs: k, cs: 1 }, vb, None, Path::best()).unwrap();
            let ct = gemm(View { data: &at, rows: m, cols: k, rs: 1, cs: m }, vb, None, Path::best()).unwrap();
            assert_eq!(c, ct, "a transposed view packs the same pairs");
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|l| a[i * k + l] as f64 * b[l * n + j] as f64);
                    let (exact, size) = terms.fold((0.0, 0.0), |(s, z), t| (s + t, z + t.abs()));
                    let bound = size * (2.0f64.powi(-8) * 2.0 + 2.0f64.powi(-16) + k as f64 * 2.0f64.powi(-24));
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound + 1e-6,
                        "[{i}, {j}] of {m}x{k}x{n}: {got} vs {exact}, bound {bound}"
                    );
                }
            }
        }
    }
}
