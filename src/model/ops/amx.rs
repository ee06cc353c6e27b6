//! Intel AMX tiles (Sapphire Rapids and later) for the bf16 products: `tdpbf16ps` multiplies a
//! 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32 sums, 16 times the work of an AVX-512
//! BF16 instruction. Stable Rust has no AMX intrinsics, so the tile instructions are inline
//! assembly; Linux hands out the tile registers only on request (`arch_prctl`), once per
//! process. `HYPERSPHERE_NO_AMX=1` turns them off (to compare with the AVX-512 kernel).

use std::sync::OnceLock;

/// Whether this CPU has AMX-TILE and AMX-BF16 and this process may use them (checked once).
pub fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| std::env::var_os("HYPERSPHERE_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 once the kernel grants the tiles
    // to this process (every thread, present and future).
    let granted: i64;
    // SAFETY: a plain system call with two integer arguments; it touches no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => granted,
            in("rdi") 0x1023i64,
            in("rsi") 18i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    granted == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Rows and f32 columns of a C tile; rows of an A tile; pairs (u32) of a tile row.
pub const TILE: usize = 16;

/// Load the tile configuration (palette 1, eight tiles of 16 rows of 64 bytes) in this thread.
///
/// # Safety
/// [`available`] must be true; [`release`] must follow before the thread does anything else.
#[cfg(target_arch = "x86_64")]
pub unsafe fn configure() {
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut cfg = Config([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t] = 64;
        cfg.0[48 + t] = TILE as u8;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

/// Give the tiles back (the thread's state shrinks to what it was).
///
/// # Safety
/// After [`configure`], on the same thread.
#[cfg(target_arch = "x86_64")]
pub unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// What the tiles multiply: bf16 pairs into f32 sums, or unsigned by signed bytes into i32.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bf16,
    Int8,
}

/// Four C tiles (tmm4-7: rows 0-15 and 16-31 of A times panels 0 and 1 of B) plus the products
/// over `words` 4-byte words of k (a multiple of 16): A as two tiles of 16 rows at stride `sa`
/// bytes (`a1` may repeat `a0`), B as two panels of rows of 16 words (64 bytes; `b1` may repeat
/// `b0`).
///
/// # Safety
/// After [`configure`]; the pointers must cover what is read.
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate(
    kind: Kind,
    a0: *const u8,
    a1: *const u8,
    sa: usize,
    b0: *const u8,
    b1: *const u8,
    words: usize,
) {
    // One instruction sequence for both kinds: only the tile product differs.
    macro_rules! step {
        ($dp:literal, $a0:expr, $a1:expr, $b0:expr, $b1:expr) => {
            std::arch::asm!(
                "tileloadd tmm0, [{a0} + {sa}*1]",
                "tileloadd tmm1, [{a1} + {sa}*1]",
                "tileloadd tmm2, [{b0} + {sb}*1]",
                "tileloadd tmm3, [{b1} + {sb}*1]",
                concat!($dp, " tmm4, tmm0, tmm2"),
                concat!($dp, " tmm5, tmm0, tmm3"),
                concat!($dp, " tmm6, tmm1, tmm2"),
                concat!($dp, " tmm7, tmm1, tmm3"),
                a0 = in(reg) $a0, a1 = in(reg) $a1, b0 = in(reg) $b0, b1 = in(reg) $b1,
                sa = in(reg) sa, sb = in(reg) 64usize,
                options(nostack, readonly),
            )
        };
    }
    for g in (0..words).step_by(TILE) {
        let (a0, a1, b0, b1) = (a0.add(4 * g), a1.add(4 * g), b0.add(64 * g), b1.add(64 * g));
        match kind {
            Kind::Bf16 => step!("tdpbf16ps", a0, a1, b0, b1),
            Kind::Int8 => step!("tdpbusd", a0, a1, b0, b1),
        }
    }
}

/// Set C tile `t` (0-3: tmm4-7) to 16 copies of the 16 values at `row` (a stride of 0), or to
/// zeros when `row` is None.
///
/// # Safety
/// After [`configure`]; `row` must hold 16 values of 4 bytes.
#[cfg(target_arch = "x86_64")]
pub unsafe fn start(t: usize, row: Option<*const u8>) {
    use std::arch::asm;
    let (r, z) = (row.unwrap_or(std::ptr::null()), 0usize);
    match (t, row.is_some()) {
        (0, true) => asm!("tileloadd tmm4, [{r} + {z}*1]", r = in(reg) r, z = in(reg) z, options(nostack, readonly)),
        (1, true) => asm!("tileloadd tmm5, [{r} + {z}*1]", r = in(reg) r, z = in(reg) z, options(nostack, readonly)),
        (2, true) => asm!("tileloadd tmm6, [{r} + {z}*1]", r = in(reg) r, z = in(reg) z, options(nostack, readonly)),
        (_, true) => asm!("tileloadd tmm7, [{r} + {z}*1]", r = in(reg) r, z = in(reg) z, options(nostack, readonly)),
        (0, false) => asm!("tilezero tmm4", options(nostack, nomem)),
        (1, false) => asm!("tilezero tmm5", options(nostack, nomem)),
        (2, false) => asm!("tilezero tmm6", options(nostack, nomem)),
        (_, false) => asm!("tilezero tmm7", options(nostack, nomem)),
    }
}

/// Store C tile `t` (0-3: tmm4-7) as 16 rows of 64 bytes at stride `stride` bytes.
///
/// # Safety
/// After [`configure`]; `dst` must have room for the 16 rows.
#[cfg(target_arch = "x86_64")]
pub unsafe fn store(t: usize, dst: *mut u8, stride: usize) {
    use std::arch::asm;
    match t {
        0 => asm!("tilestored [{d} + {s}*1], tmm4", d = in(reg) dst, s = in(reg) stride, options(nostack)),
        1 => asm!("tilestored [{d} + {s}*1], tmm5", d = in(reg) dst, s = in(reg) stride, options(nostack)),
        2 => asm!("tilestored [{d} + {s}*1], tmm6", d = in(reg) dst, s = in(reg) stride, options(nostack)),
        _ => asm!("tilestored [{d} + {s}*1], tmm7", d = in(reg) dst, s = in(reg) stride, options(nostack)),
    }
}

/// `out` [rows, n] (row-major; the rows of C from `r0`) = `init` (per column) + A · B, from the
/// operands packed for tiles: A as rows of `k2` pairs (u32: two bf16, the lower first) with at
/// least `r0 + rows` rounded up to 16 rows; B as `init.len() / 16` panels of 16 columns, each
/// `k2` rows of 16 pairs; `k2` a multiple of 16; `r0` a multiple of 16. Every one of the
/// rows x n outputs is stored, none read: `out` may be uninitialised.
///
/// # Safety
/// [`available`] must be true, the slices must hold what is described above, and `out` must
/// be valid for writes of rows x n values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn bf16_rows(
    a: &[u32],
    b: &[u32],
    k2: usize,
    init: &[f32],
    n: usize,
    r0: usize,
    rows: usize,
    out: *mut f32,
) {
    debug_assert!(k2.is_multiple_of(TILE) && r0.is_multiple_of(TILE));
    debug_assert!(a.len() >= (r0 + rows).div_ceil(TILE) * TILE * k2 && b.len() >= init.len() * k2);
    configure();
    let panels = init.len() / TILE;
    let mut spill = [0f32; TILE * TILE];
    for rb in (0..rows).step_by(2 * TILE) {
        let two_rows = rows - rb > TILE;
        for q in (0..panels).step_by(2) {
            let two_cols = q + 1 < panels;
            let q1 = q + two_cols as usize;
            // Each C tile starts as its columns' init, repeated down the rows.
            for (t, p) in [q, q1, q, q1].into_iter().enumerate() {
                start(t, Some(init.as_ptr().add(p * TILE) as *const u8));
            }
            // At an edge the second row or column tile repeats the first and is not stored.
            let a0 = a.as_ptr().add((r0 + rb) * k2) as *const u8;
            let a1 = if two_rows { a0.add(4 * TILE * k2) } else { a0 };
            let (b0, b1) = (b.as_ptr().add(q * k2 * TILE) as *const u8, b.as_ptr().add(q1 * k2 * TILE) as *const u8);
            accumulate(Kind::Bf16, a0, a1, 4 * k2, b0, b1, k2);
            for (t, (dr, dq)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                if (dr == 1 && !two_rows) || (dq == 1 && !two_cols) {
                    continue;
                }
                let (r, j) = (rb + dr * TILE, (q + dq) * TILE);
                let (valid_rows, valid_cols) = ((rows - r).min(TILE), (n - j).min(TILE));
                if valid_rows == TILE && valid_cols == TILE {
                    store(t, out.add(r * n + j) as *mut u8, 4 * n);
                    continue;
                }
                store(t, spill.as_mut_ptr() as *mut u8, 4 * TILE);
                for i in 0..valid_rows {
                    std::ptr::copy_nonoverlapping(spill.as_ptr().add(i * TILE), out.add((r + i) * n + j), valid_cols);
                }
            }
        }
    }
    release();
}
