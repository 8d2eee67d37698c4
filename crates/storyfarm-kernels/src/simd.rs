//! Branch-free, auto-vectorisable `exp`, SiLU and erf-GELU (a few ulp from libm), and the
//! `multiversion!` macro that compiles a loop once for AVX2+FMA and once for the baseline
//! target, picking at run time.

/// Defines `fn $name` that runs the body compiled with AVX2/FMA when the CPU has them.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                /// `inner` compiled with AVX2 and FMA.
                ///
                /// # Safety
                /// The CPU must support AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if crate::simd::has_avx2() {
                    // SAFETY: `has_avx2()` saw both AVX2 and FMA on this CPU
                    // (`is_x86_feature_detected!`).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `e^x` (Cephes polynomial, about 2 ulp); exactly 0 below -87.3 (and for `-inf`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // 5.0000001e-1 rounds to exactly 0.5 in f32
    let y = p * r * r + r + 1.0;
    // The integer n sits in the low mantissa bits of t; wrapping ops keep the loop
    // vectorisable under overflow checks (|n| <= 127, nothing actually wraps).
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// `x * sigmoid(x)` as candle computes it: `x / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `x * (1 + erf(x / sqrt 2)) / 2` via the erfc approximation of Numerical Recipes (relative
/// error below 1.2e-7).
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    let erfc = t * exp(p - z * z);
    // x >= 0: x (2 - erfc) / 2; x < 0: x erfc / 2.
    let f = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_silu_gelu_match_libm() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            // Below -87.3 the result is flushed to zero (e^-87.3 is ~1e-38).
            assert!(
                (got - want).abs() <= 4e-7 * want + 1.3e-38,
                "exp({x}) {got} vs {want}"
            );
            let s = x / (1.0 + (-x).exp());
            assert!(
                (silu(x) - s).abs() <= 1e-6 * s.abs().max(1e-30),
                "silu({x})"
            );
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
            let got = gelu_erf(x) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({x}) {got} vs {want}"
            );
            x += 0.0031;
        }
    }

    /// erf by its Taylor series / continued fraction in f64 (reference only).
    fn erf64(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut sum, mut term, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let z = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
            x.signum() * (1.0 - erfc)
        }
    }
}
