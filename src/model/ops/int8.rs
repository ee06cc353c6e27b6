//! Linear layers in int8 for inference (`--dtype int8`): each weight row (output channel)
//! quantized symmetrically when the model loads, each activation row when it arrives, and the
//! byte products summed in i32 by AVX-512 VNNI (`vpdpbusd`: 64 multiply-adds an instruction,
//! against 16 for an f32 FMA). Attention, layer norm, GELU and pooling stay f32.
//!
//! Integer sums are exact, so the VNNI kernel, the AMX one ([`super::amx`]: the products in
//! tiles, the VNNI epilogue) and the portable one give the same bits; CPUs without VNNI run the
//! portable one (slower than f32: the CLI says so).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Output channels per register: 16 i32 sums in 512 bits.
const LANES: usize = 16;
/// A register tile: `ROWS` activation rows x `PANELS` panels of 16 channels, 24 of the 32
/// vector registers as accumulators.
const ROWS: usize = 8;
const PANELS: usize = 3;
/// Rows a block: their bytes stay in L1 while every panel passes, and their outputs in L2
/// for the epilogue.
const BLOCK: usize = 64;

/// What follows the product, applied while the outputs are still in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `x Wᵀ + b`.
    Bias,
    /// `gelu(x Wᵀ + b)`, exact (erf) GELU.
    BiasGelu,
}

/// Which kernel multiplies; every one gives the same bits (integer sums are exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Portable,
    /// AVX-512 VNNI (`vpdpbusd`: 64 multiply-adds an instruction).
    Vnni,
    /// AMX tiles (`tdpbusd`: 16 x 16 x 64 an instruction) for the products, the VNNI kernel's
    /// epilogue; layers whose inputs are not a multiple of 64 take the VNNI kernel.
    Amx,
}

impl Path {
    /// The fastest this CPU has.
    pub fn best() -> Self {
        if vnni_supported() && super::amx::available() {
            Path::Amx
        } else if vnni_supported() {
            Path::Vnni
        } else {
            Path::Portable
        }
    }
}

/// Whether this CPU runs the VNNI kernel (AVX-512 F, BW, VL and VNNI), checked at run time.
pub fn vnni_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix [out, inp] with its bias, quantized per output channel and packed for the
/// kernel.
#[derive(Debug)]
pub struct QWeight {
    out: usize,
    inp: usize,
    /// `inp` rounded up to a multiple of 4: VNNI sums 4 byte products a lane.
    k4: usize,
    /// Panels of 16 channels; in each, groups of 4 inputs; in each, 16 x 4 weights:
    /// [panels][k4 / 4][16][4]. Padding (channels past `out`, inputs past `inp`) is 0.
    packed: Vec<i8>,
    /// Per channel (padded to whole panels): the weight scale; 128 x the sum of its quantized
    /// weights, which the activations' +128 offset adds to every sum; the bias.
    scale: Vec<f32>,
    offset: Vec<i32>,
    bias: Vec<f32>,
}

impl QWeight {
    /// Quantize `w` [out, inp] (row-major) to int8 per row: scale max|row| / 127, round to
    /// nearest even.
    pub fn new(w: &[f32], b: &[f32], out: usize, inp: usize) -> Result<Self> {
        if w.len() != out * inp || b.len() != out {
            bail!("int8 linear: weight of {} values for [{out}, {inp}], bias of {}", w.len(), b.len())
        }
        let k4 = inp.div_ceil(4) * 4;
        let channels = out.div_ceil(LANES) * LANES;
        let mut packed = vec![0i8; channels * k4];
        let (mut scale, mut offset, mut bias) = (vec![0f32; channels], vec![0i32; channels], vec![0f32; channels]);
        for (o, row) in w.chunks_exact(inp.max(1)).enumerate().take(out) {
            let s = scale_of(row);
            let (panel, lane) = (o / LANES, o % LANES);
            let mut sum = 0i32;
            for (i, &v) in row.iter().enumerate() {
                let q = (v / s).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                packed[panel * k4 * LANES + (i / 4) * 4 * LANES + lane * 4 + i % 4] = q;
            }
            (scale[o], offset[o], bias[o]) = (s, 128 * sum, b[o]);
        }
        Ok(Self { out, inp, k4, packed, scale, offset, bias })
    }

    /// Input features.
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// Output channels.
    pub fn out(&self) -> usize {
        self.out
    }

    /// `x` [rows, inp] -> [rows, out]: `x Wᵀ + b` with both sides quantized, then `epi`, by
    /// the kernel `path` (which the CPU must have); all give the same bits.
    pub fn forward(&self, x: &[f32], epi: Epilogue, path: Path) -> Vec<f32> {
        let (a, sx) = quantize_rows(x, self.inp, self.k4, path != Path::Portable);
        self.forward_quantized(&a, &sx, epi, path)
    }

    /// [`QWeight::forward`] from inputs already quantized: `a` rows of `k4` bytes, `sx` their
    /// scales.
    pub fn forward_quantized(&self, a: &[u8], sx: &[f32], epi: Epilogue, path: Path) -> Vec<f32> {
        let rows = sx.len();
        // Not zero-filled: every kernel writes every output once (a memset and its page faults
        // cost as much as a fifth of the GEMM).
        let mut out = Vec::<f32>::with_capacity(rows * self.out);
        // Whole register (or tile) rows per work item, two items per thread.
        let per = rows.div_ceil(2 * rayon::current_num_threads()).div_ceil(32).max(1) * 32;
        let spare = &mut out.spare_capacity_mut()[..rows * self.out];
        spare.par_chunks_mut(per * self.out.max(1)).enumerate().for_each(|(c, chunk)| {
            let (r0, n) = (c * per, chunk.len() / self.out.max(1));
            self.rows(&a[r0 * self.k4..(r0 + n) * self.k4], &sx[r0..r0 + n], chunk, epi, path);
        });
        // SAFETY: every one of the rows * out values was written above.
        unsafe { out.set_len(rows * self.out) };
        out
    }

    /// `gelu(x Wᵀ + b)` quantized per row as the next int8 layer takes it (`next_k4` bytes a
    /// row, [`quantize_rows`]' bytes and scales), a block of rows at a time while it is in
    /// cache: the f32 rows, the widest of the layer, are never all in memory.
    pub fn forward_gelu_quantized(&self, x: &[f32], next_k4: usize, path: Path) -> (Vec<u8>, Vec<f32>) {
        let (a, sx) = quantize_rows(x, self.inp, self.k4, path != Path::Portable);
        let rows = sx.len();
        let (mut qa, mut qs) = (vec![128u8; rows * next_k4], vec![0f32; rows]);
        let per = rows.div_ceil(2 * rayon::current_num_threads()).div_ceil(32).max(1) * 32;
        qa.par_chunks_mut((per * next_k4).max(1)).zip(qs.par_chunks_mut(per)).enumerate().for_each(|(c, (qa, qs))| {
            let r0 = c * per;
            let mut block = Vec::<f32>::with_capacity(BLOCK * self.out);
            for b0 in (0..qs.len()).step_by(BLOCK) {
                let m = (qs.len() - b0).min(BLOCK);
                let (r, spare) = (r0 + b0, &mut block.spare_capacity_mut()[..m * self.out]);
                self.rows(&a[r * self.k4..(r + m) * self.k4], &sx[r..r + m], spare, Epilogue::BiasGelu, path);
                // SAFETY: `rows` wrote all m * out values.
                let y = unsafe { &*(spare as *const [std::mem::MaybeUninit<f32>] as *const [f32]) };
                for ((row, q), s) in
                    y.chunks_exact(self.out).zip(qa[b0 * next_k4..].chunks_exact_mut(next_k4)).zip(&mut qs[b0..b0 + m])
                {
                    *s = quantize_one(row, q, path != Path::Portable);
                }
            }
        });
        (qa, qs)
    }

    /// Rows of `out` (`sx.len()` of them) from their quantized inputs, by `path`.
    fn rows(&self, a: &[u8], sx: &[f32], chunk: &mut [std::mem::MaybeUninit<f32>], epi: Epilogue, path: Path) {
        let path = if path == Path::Amx && !self.k4.is_multiple_of(64) { Path::Vnni } else { path };
        let out = chunk.as_mut_ptr() as *mut f32;
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Vnni | Path::Amx => {
                assert!(vnni_supported(), "int8 linear: the VNNI kernel asked for on a CPU without it");
                if path == Path::Amx {
                    assert!(super::amx::available(), "int8 linear: AMX asked for on a CPU without it");
                    // SAFETY: AMX and VNNI are there (checked above); k4 is a multiple of 64;
                    // `a`, `sx` and `chunk` hold the same rows of k4, 1 and out values.
                    unsafe { vnni::rows_amx(self, a, sx, out, epi) };
                } else {
                    // SAFETY: the CPU has the features (checked above); `a`, `sx` and `chunk`
                    // hold the same rows of k4, 1 and out values, which is all the kernel reads
                    // and writes.
                    unsafe { vnni::rows(self, a, sx, out, epi) };
                }
            }
            _ => {
                self.rows_portable(a, sx, chunk);
                if epi == Epilogue::BiasGelu {
                    // SAFETY: rows_portable wrote every value of the chunk.
                    super::gelu::gelu_in_place(unsafe {
                        &mut *(chunk as *mut [std::mem::MaybeUninit<f32>] as *mut [f32])
                    });
                }
            }
        }
    }

    /// The kernel's arithmetic one output at a time.
    fn rows_portable(&self, a: &[u8], sx: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        for ((row, &s), y) in a.chunks_exact(self.k4).zip(sx).zip(out.chunks_exact_mut(self.out)) {
            for (o, y) in y.iter_mut().enumerate() {
                let (panel, lane) = (o / LANES, o % LANES);
                let w = &self.packed[panel * self.k4 * LANES..(panel + 1) * self.k4 * LANES];
                let acc: i32 = row
                    .iter()
                    .enumerate()
                    .map(|(i, &u)| u as i32 * w[(i / 4) * 4 * LANES + lane * 4 + i % 4] as i32)
                    .sum();
                y.write(self.finish(acc, s, o));
            }
        }
    }

    /// One output from its integer sum: the same float operations as the VNNI epilogue.
    #[inline]
    fn finish(&self, acc: i32, sx: f32, o: usize) -> f32 {
        ((acc - self.offset[o]) as f32 * sx).mul_add(self.scale[o], self.bias[o])
    }
}

/// A row's (or weight row's) scale: its largest magnitude maps to 127; 1 for an all-zero row.
fn scale_of(row: &[f32]) -> f32 {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max > 0.0 && max.is_finite() {
        max / 127.0
    } else {
        1.0
    }
}

/// Rows of `x` [rows, inp] as bytes q + 128 (q = round(x / s) to nearest even, in
/// [-127, 127], s the row's scale) at stride `k4`, padded with 128 (q = 0), and each row's
/// scale. `vnni`: with AVX-512 (the same bytes for finite inputs).
fn quantize_rows(x: &[f32], inp: usize, k4: usize, vnni: bool) -> (Vec<u8>, Vec<f32>) {
    let rows = x.len() / inp.max(1);
    let mut a = vec![128u8; rows * k4];
    let mut sx = vec![0f32; rows];
    let per = (crate::cpu::CHUNK / k4.max(1)).max(1);
    a.par_chunks_mut(per * k4.max(1)).zip(sx.par_chunks_mut(per)).zip(x.par_chunks(per * inp.max(1))).for_each(
        |((q, s), x)| {
            for ((q, s), row) in q.chunks_exact_mut(k4.max(1)).zip(s).zip(x.chunks_exact(inp.max(1))) {
                *s = quantize_one(row, q, vnni);
            }
        },
    );
    (a, sx)
}

/// One row into `q` and its scale, with AVX-512 when `vnni` (the same bytes for finite inputs).
fn quantize_one(row: &[f32], q: &mut [u8], vnni: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // SAFETY: `vnni` is asked for only where the CPU has it; `q` holds at least
        // `row.len()` bytes.
        return unsafe { vnni::quantize_row(row, q) };
    }
    let _ = vnni;
    quantize_row(row, q)
}

/// One row's bytes (the first `row.len()` of `q`) and its scale.
fn quantize_row(row: &[f32], q: &mut [u8]) -> f32 {
    let s = scale_of(row);
    let inv = 1.0 / s;
    for (q, &v) in q.iter_mut().zip(row) {
        *q = ((v * inv).round_ties_even().clamp(-127.0, 127.0) + 128.0) as u8;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Epilogue, QWeight, BLOCK, LANES, PANELS, ROWS};
    use std::arch::x86_64::*;

    /// [`super::quantize_row`] in 16 lanes: `vcvtps2dq` rounds to nearest even, as
    /// `round_ties_even` does.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn quantize_row(row: &[f32], q: &mut [u8]) -> f32 {
        let n = row.len();
        let full = n / LANES * LANES;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
        let mut max = _mm512_setzero_ps();
        for i in (0..full).step_by(LANES) {
            max = _mm512_max_ps(max, _mm512_abs_ps(_mm512_loadu_ps(row.as_ptr().add(i))));
        }
        max = _mm512_max_ps(max, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row.as_ptr().add(full))));
        let max = _mm512_reduce_max_ps(max);
        let s = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
        let inv = _mm512_set1_ps(1.0 / s);
        let (lo, hi, offset) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127), _mm512_set1_epi32(128));
        let bytes = |v: __m512| {
            let i = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
            _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(i, lo), hi), offset))
        };
        for i in (0..full).step_by(LANES) {
            _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut _, bytes(_mm512_loadu_ps(row.as_ptr().add(i))));
        }
        if full < n {
            let b = bytes(_mm512_maskz_loadu_ps(tail, row.as_ptr().add(full)));
            _mm_mask_storeu_epi8(q.as_mut_ptr().add(full) as *mut _, tail, b);
        }
        s
    }

    /// All `sx.len()` rows of `out` (`out` [rows, w.out], written before it is read), a block
    /// of rows at a time: panel triples outside, register tiles of rows inside, then the
    /// epilogue over the block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows(w: &QWeight, a: &[u8], sx: &[f32], out: *mut f32, epi: Epilogue) {
        let n = sx.len();
        for r0 in (0..n).step_by(BLOCK) {
            let m = (n - r0).min(BLOCK);
            block(w, &a[r0 * w.k4..(r0 + m) * w.k4], &sx[r0..r0 + m], out.add(r0 * w.out));
            if epi == Epilogue::BiasGelu {
                crate::model::ops::gelu::gelu_in_place(std::slice::from_raw_parts_mut(out.add(r0 * w.out), m * w.out));
            }
        }
    }

    /// [`rows`] with the products in AMX tiles, 32 rows x 32 channels at a time: the i32 sums
    /// go through a spill buffer into the same epilogue (so the same bits). The last rows of a
    /// chunk are copied into a zero-padded block of 32 first (tiles read 16 rows).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_amx(w: &QWeight, a: &[u8], sx: &[f32], out: *mut f32, epi: Epilogue) {
        use crate::model::ops::amx;
        let (n, k4, panels) = (sx.len(), w.k4, w.scale.len() / LANES);
        let mut sums = [0i32; 4 * LANES * LANES];
        let mut tail = Vec::new();
        amx::configure();
        for r0 in (0..n).step_by(BLOCK) {
            let m = (n - r0).min(BLOCK);
            for rb in (r0..r0 + m).step_by(32) {
                let rows = (r0 + m - rb).min(32);
                let a0 = if rows == 32 {
                    a.as_ptr().add(rb * k4)
                } else {
                    tail.clear();
                    tail.extend_from_slice(&a[rb * k4..(rb + rows) * k4]);
                    tail.resize(32 * k4, 128);
                    tail.as_ptr()
                };
                let a1 = if rows > 16 { a0.add(16 * k4) } else { a0 };
                for p in (0..panels).step_by(2) {
                    let p1 = (p + 1).min(panels - 1);
                    for t in 0..4 {
                        amx::start(t, None);
                    }
                    let (b0, b1) = (w.packed.as_ptr().add(p * k4 * LANES), w.packed.as_ptr().add(p1 * k4 * LANES));
                    amx::accumulate(amx::Kind::Int8, a0, a1, k4, b0 as *const u8, b1 as *const u8, k4 / 4);
                    for t in 0..4 {
                        amx::store(t, sums.as_mut_ptr().add(t * LANES * LANES) as *mut u8, 4 * LANES);
                    }
                    for (t, (dr, dq)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                        if dr * 16 >= rows || p + dq > p1 {
                            continue;
                        }
                        let (o, r0) = ((p + dq) * LANES, rb + dr * 16);
                        let finish = Finish::new(w, o);
                        for i in 0..(rows - dr * 16).min(16) {
                            let acc = _mm512_loadu_si512(sums.as_ptr().add(t * LANES * LANES + i * LANES) as *const _);
                            finish.store(acc, sx[r0 + i], out.add((r0 + i) * w.out + o));
                        }
                    }
                }
            }
            if epi == Epilogue::BiasGelu {
                crate::model::ops::gelu::gelu_in_place(std::slice::from_raw_parts_mut(out.add(r0 * w.out), m * w.out));
            }
        }
        amx::release();
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn block(w: &QWeight, a: &[u8], sx: &[f32], out: *mut f32) {
        let (n, panels) = (sx.len(), w.scale.len() / LANES);
        let mut p = 0;
        while p < panels {
            let c = (panels - p).min(PANELS);
            let mut r = 0;
            while r < n {
                let m = (n - r).min(ROWS);
                let (a, sx, out) = (a[r * w.k4..].as_ptr(), &sx[r..r + m], out.add(r * w.out));
                match m {
                    8 => tile_c::<8>(w, p, c, a, sx, out),
                    7 => tile_c::<7>(w, p, c, a, sx, out),
                    6 => tile_c::<6>(w, p, c, a, sx, out),
                    5 => tile_c::<5>(w, p, c, a, sx, out),
                    4 => tile_c::<4>(w, p, c, a, sx, out),
                    3 => tile_c::<3>(w, p, c, a, sx, out),
                    2 => tile_c::<2>(w, p, c, a, sx, out),
                    _ => tile_c::<1>(w, p, c, a, sx, out),
                }
                r += m;
            }
            p += c;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile_c<const R: usize>(w: &QWeight, p: usize, c: usize, a: *const u8, sx: &[f32], out: *mut f32) {
        match c {
            3 => tile::<R, 3>(w, p, a, sx, out),
            2 => tile::<R, 2>(w, p, a, sx, out),
            _ => tile::<R, 1>(w, p, a, sx, out),
        }
    }

    /// R rows x C panels starting at panel `p0`: the sums in registers over all of k, then
    /// `(sum - offset) * sx * scale + bias` stored (masked past the last channel).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const C: usize>(w: &QWeight, p0: usize, a: *const u8, sx: &[f32], out: *mut f32) {
        let k4 = w.k4;
        let wp = w.packed.as_ptr().add(p0 * k4 * LANES);
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        for g in 0..k4 / 4 {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(c * k4 * LANES + g * 4 * LANES) as *const _);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((a.add(r * k4 + g * 4) as *const i32).read_unaligned());
                for (acc, &wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_dpbusd_epi32(*acc, av, wv);
                }
            }
        }
        for c in 0..C {
            let o = (p0 + c) * LANES;
            let finish = Finish::new(w, o);
            for (r, acc) in acc.iter().enumerate() {
                finish.store(acc[c], sx[r], out.add(r * w.out + o));
            }
        }
    }

    /// The epilogue of 16 channels from `o`, shared by the VNNI and AMX kernels (so they give
    /// the same bits): `(sum - offset) * sx * scale + bias`, stored masked past the last channel.
    struct Finish {
        offset: __m512i,
        scale: __m512,
        bias: __m512,
        mask: __mmask16,
    }

    impl Finish {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        #[inline]
        unsafe fn new(w: &QWeight, o: usize) -> Self {
            let valid = (w.out - o).min(LANES);
            Self {
                offset: _mm512_loadu_si512(w.offset.as_ptr().add(o) as *const _),
                scale: _mm512_loadu_ps(w.scale.as_ptr().add(o)),
                bias: _mm512_loadu_ps(w.bias.as_ptr().add(o)),
                mask: if valid == LANES { 0xFFFF } else { (1u16 << valid) - 1 },
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        #[inline]
        unsafe fn store(&self, acc: __m512i, sx: f32, dst: *mut f32) {
            let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, self.offset));
            let y = _mm512_fmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx)), self.scale, self.bias);
            _mm512_mask_storeu_ps(dst, self.mask, y);
        }
    }
}

/// `x Wᵀ + b` over the last dimension of `x` with `w`'s int8 weights, then `epi` (no backward:
/// inference only); the VNNI kernel where the CPU has it.
pub fn linear_int8(xs: &Tensor, w: &Arc<QWeight>, epi: Epilogue) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Int8Linear(w.clone(), epi))
}

struct Int8Linear(Arc<QWeight>, Epilogue);

impl CustomOp1 for Int8Linear {
    fn name(&self) -> &'static str {
        "int8-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32s(s, l, self.name())?;
        let w = &self.0;
        let mut shape = l.dims().to_vec();
        match shape.last_mut() {
            Some(last) if *last == w.inp => *last = w.out,
            _ => bail!("int8 linear: input of shape {:?} for {} features", l.dims(), w.inp),
        }
        Ok((CpuStorage::F32(w.forward(x, self.1, Path::best())), Shape::from(shape)))
    }
}

/// The feed-forward block `gelu(x W1ᵀ + b1) W2ᵀ + b2` over the last dimension of `x`, both
/// layers in int8: the wide GELU rows go from one to the other quantized, a block at a time
/// ([`QWeight::forward_gelu_quantized`]); the same bits as the two layers one after the other.
pub fn ffn_int8(xs: &Tensor, up: &Arc<QWeight>, down: &Arc<QWeight>) -> Result<Tensor> {
    if up.out != down.inp {
        bail!("int8 feed-forward: {} features into a layer of {}", up.out, down.inp)
    }
    xs.contiguous()?.apply_op1_no_bwd(&Int8Ffn(up.clone(), down.clone()))
}

struct Int8Ffn(Arc<QWeight>, Arc<QWeight>);

impl CustomOp1 for Int8Ffn {
    fn name(&self) -> &'static str {
        "int8-feed-forward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32s(s, l, self.name())?;
        let (up, down) = (&self.0, &self.1);
        let mut shape = l.dims().to_vec();
        match shape.last_mut() {
            Some(last) if *last == up.inp => *last = down.out,
            _ => bail!("int8 feed-forward: input of shape {:?} for {} features", l.dims(), up.inp),
        }
        let path = Path::best();
        let (a, sx) = up.forward_gelu_quantized(x, down.k4, path);
        Ok((CpuStorage::F32(down.forward_quantized(&a, &sx, Epilogue::Bias, path)), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Shapes with odd widths (padding of inputs to 4 and channels to 16, partial tiles).
    const SHAPES: [(usize, usize, usize); 6] =
        [(1, 4, 16), (3, 5, 17), (9, 37, 50), (17, 64, 48), (24, 33, 100), (8, 1, 1)];

    fn random(n: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    #[test]
    fn vnni_kernel_gives_the_portable_bits() {
        if !vnni_supported() {
            eprintln!("note: this CPU has no AVX-512 VNNI; the VNNI kernel is not checked");
            return;
        }
        let mut rng = StdRng::seed_from_u64(1);
        for (rows, inp, out) in SHAPES {
            let (mut x, w, b) =
                (random(rows * inp, 3.0, &mut rng), random(out * inp, 0.2, &mut rng), random(out, 1.0, &mut rng));
            x[0] = 0.0; // a zero and an exact half-way value: rounding must agree
            let q = QWeight::new(&w, &b, out, inp).unwrap();
            assert_eq!(quantize_rows(&x, inp, q.k4, true), quantize_rows(&x, inp, q.k4, false), "{rows}x{inp}");
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(
                bits(q.forward(&x, Epilogue::Bias, Path::Vnni)),
                bits(q.forward(&x, Epilogue::Bias, Path::Portable)),
                "{rows}x{inp}->{out}"
            );
        }
    }

    /// AMX tiles: the portable bits too, for inputs that are a multiple of 64 (others take the
    /// VNNI kernel), rows in partial tiles and chunks, odd channel panels, GELU fused.
    #[test]
    fn amx_tiles_give_the_portable_bits() {
        if Path::best() != Path::Amx {
            eprintln!("note: this CPU (or process) has no AMX; the tile kernel is not checked");
            return;
        }
        let mut rng = StdRng::seed_from_u64(4);
        for (rows, inp, out) in [(1, 64, 16), (17, 64, 48), (33, 128, 17), (2 * BLOCK + 7, 384, 100), (40, 40, 40)] {
            let (x, w, b) =
                (random(rows * inp, 3.0, &mut rng), random(out * inp, 0.2, &mut rng), random(out, 1.0, &mut rng));
            let q = QWeight::new(&w, &b, out, inp).unwrap();
            for epi in [Epilogue::Bias, Epilogue::BiasGelu] {
                let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
                assert_eq!(
                    bits(q.forward(&x, epi, Path::Amx)),
                    bits(q.forward(&x, epi, Path::Portable)),
                    "{rows}x{inp}->{out} {epi:?}"
                );
            }
        }
    }

    /// The feed-forward block fused (the wide GELU rows quantized block by block) gives the
    /// unfused bits on every kernel this CPU has, over several blocks and chunks.
    #[test]
    fn fused_gelu_quantization_gives_the_unfused_bits() {
        let mut rng = StdRng::seed_from_u64(5);
        let paths = match Path::best() {
            Path::Amx => vec![Path::Portable, Path::Vnni, Path::Amx],
            Path::Vnni => vec![Path::Portable, Path::Vnni],
            Path::Portable => vec![Path::Portable],
        };
        for (rows, inp, mid) in [(3, 64, 128), (2 * BLOCK + 37, 64, 256), (70, 40, 90)] {
            let x = random(rows * inp, 3.0, &mut rng);
            let (w1, b1) = (random(mid * inp, 0.2, &mut rng), random(mid, 1.0, &mut rng));
            let (w2, b2) = (random(inp * mid, 0.2, &mut rng), random(inp, 1.0, &mut rng));
            let (up, down) = (QWeight::new(&w1, &b1, mid, inp).unwrap(), QWeight::new(&w2, &b2, inp, mid).unwrap());
            for &path in &paths {
                let unfused = down.forward(&up.forward(&x, Epilogue::BiasGelu, path), Epilogue::Bias, path);
                let (a, sx) = up.forward_gelu_quantized(&x, down.k4, path);
                let fused = down.forward_quantized(&a, &sx, Epilogue::Bias, path);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fused), bits(&unfused), "{rows}x{inp}x{mid} {path:?}");
            }
        }
    }

    /// Each output within the rounding bound of symmetric quantization: with x = sx q + e and
    /// w = sw p + d (|e| <= sx / 2, |d| <= sw / 2), x w - sx sw q p = e w + x d - e d.
    #[test]
    fn int8_linear_is_within_the_quantization_bound_of_f64() {
        let mut rng = StdRng::seed_from_u64(2);
        for (rows, inp, out) in SHAPES {
            let (x, w, b) =
                (random(rows * inp, 3.0, &mut rng), random(out * inp, 0.2, &mut rng), random(out, 1.0, &mut rng));
            let q = QWeight::new(&w, &b, out, inp).unwrap();
            let y = q.forward(&x, Epilogue::Bias, Path::best());
            for r in 0..rows {
                let xr = &x[r * inp..(r + 1) * inp];
                let sx = scale_of(xr) as f64;
                for o in 0..out {
                    let wr = &w[o * inp..(o + 1) * inp];
                    let sw = scale_of(wr) as f64;
                    let exact: f64 = xr.iter().zip(wr).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() + b[o] as f64;
                    let bound: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(&a, &c)| sx / 2.0 * (c as f64).abs() + (a as f64).abs() * sw / 2.0 + sx * sw / 4.0)
                        .sum();
                    let got = y[r * out + o] as f64;
                    assert!((got - exact).abs() <= bound * 1.001 + 1e-5, "[{r}, {o}]: {got} vs {exact}, bound {bound}");
                }
            }
        }
    }

    /// Inputs and weights on the quantization grids come out exact (to f32 rounding).
    #[test]
    fn values_on_the_grid_are_exact() {
        let (rows, inp, out) = (2, 8, 3);
        let x: Vec<f32> = (0..rows * inp).map(|i| [127.0, -127.0, 5.0, 0.0][i % 4] * 0.25).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| [-127.0, 3.0, 127.0, 64.0][(i + i / inp) % 4] * 0.01).collect();
        let b = vec![0.5, -0.5, 0.0];
        let q = QWeight::new(&w, &b, out, inp).unwrap();
        let y = q.forward(&x, Epilogue::Bias, Path::best());
        for r in 0..rows {
            for o in 0..out {
                let exact: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum::<f32>() + b[o];
                assert!((y[r * out + o] - exact).abs() <= 1e-4 * exact.abs().max(1.0), "{} vs {exact}", y[r * out + o]);
            }
        }
    }

    /// The fused GELU is GELU of the plain product, bit for bit, on both kernels, over several
    /// row blocks.
    #[test]
    fn gelu_epilogue_is_gelu_of_the_product() {
        let mut rng = StdRng::seed_from_u64(3);
        let kernels = match Path::best() {
            Path::Amx => vec![Path::Portable, Path::Vnni, Path::Amx],
            Path::Vnni => vec![Path::Portable, Path::Vnni],
            Path::Portable => vec![Path::Portable],
        };
        for (rows, inp, out) in [(3, 5, 17), (2 * BLOCK + 5, 40, 20)] {
            let (x, w, b) =
                (random(rows * inp, 3.0, &mut rng), random(out * inp, 0.2, &mut rng), random(out, 1.0, &mut rng));
            let q = QWeight::new(&w, &b, out, inp).unwrap();
            for &path in &kernels {
                let gelu = |v: f32| 0.5 * v * (1.0 + crate::cpu::erf(v * crate::cpu::FRAC_1_SQRT_2));
                let want: Vec<u32> =
                    q.forward(&x, Epilogue::Bias, path).into_iter().map(|v| gelu(v).to_bits()).collect();
                let got: Vec<u32> = q.forward(&x, Epilogue::BiasGelu, path).into_iter().map(f32::to_bits).collect();
                assert_eq!(got, want, "{rows}x{inp}->{out}, {path:?}");
            }
        }
    }

    #[test]
    fn zero_rows_and_mismatched_shapes() {
        let q = QWeight::new(&[0.0; 8], &[1.0, 2.0], 2, 4).unwrap();
        assert_eq!(
            q.forward(&[0.0; 4], Epilogue::Bias, Path::best()),
            vec![1.0, 2.0],
            "an all-zero row and weight give the bias"
        );
        assert!(q.forward(&[], Epilogue::Bias, Path::Portable).is_empty());
        assert!(QWeight::new(&[0.0; 7], &[1.0, 2.0], 2, 4).is_err());
    }
}
