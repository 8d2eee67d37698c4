//! The SIMD width the hand-written kernels run at: the widest this CPU has, unless
//! `STORYFARM_CPU_SIMD` caps it (`avx2` runs the AVX2 kernels on an AVX-512 machine, `none` the
//! portable paths), so that one machine can time and test every width side by side.

use std::sync::OnceLock;

/// An instruction set a kernel is written for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    /// AVX2 and FMA (256-bit, 16 registers): every x86-64 CPU since Haswell and Zen.
    Avx2,
    /// AVX-512F (512-bit, 32 registers): Skylake-SP and later Xeons, Zen 4 and Zen 5.
    Avx512,
}

impl Isa {
    /// The widest instruction set this CPU has, capped by `STORYFARM_CPU_SIMD`; `None` where
    /// the kernels fall back to portable code.
    pub(crate) fn best() -> Option<Isa> {
        static BEST: OnceLock<Option<Isa>> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("STORYFARM_CPU_SIMD").ok();
            let cap = match cap.as_deref().map(str::trim) {
                Some("none" | "off" | "portable") => return None,
                Some("avx2") => Isa::Avx2,
                // Unset, `avx512`, `auto` or anything else: no cap.
                _ => Isa::Avx512,
            };
            Self::detected().into_iter().filter(|&i| i <= cap).max()
        })
    }

    /// Every instruction set this CPU runs, whatever the cap (the tests run each).
    pub(crate) fn detected() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut found = Vec::new();
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                found.push(Isa::Avx2);
                // Our AVX-512 kernels also use AVX2/FMA instructions (GEGLU's gate), which
                // every AVX-512F CPU has.
                if is_x86_feature_detected!("avx512f") {
                    found.push(Isa::Avx512);
                }
            }
            found
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }
}
