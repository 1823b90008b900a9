//! `pow`, the one C math function the program still calls: tokio's
//! multi-threaded scheduler (the gateway's runtime) averages task poll
//! times with it. Defined here, from the `libm` crate (musl's routines in
//! Rust), so that the program does not load the C math library at all.
//! Loading `libm.so.6` runs its IFUNC resolvers, spread over its text, and
//! the kernel maps 64 KiB around each page they touch: about 370 kB
//! resident in every sidecar, for one function that a sidecar's
//! single-threaded runtime never calls.
//!
//! A definition in the program takes precedence over a shared library's,
//! and the linker (`--as-needed`) then drops `libm.so.6`. The release
//! benchmark (`tests/perf/run.sh`) logs the program's shared libraries and
//! warns when `libm.so.6` is among them: a new call to another C math
//! function brings the library back.

/// `x` raised to the power `y`, as C's `pow`.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pow_is_the_c_function() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(9.0, 0.5), 3.0);
        assert_eq!(super::pow(0.0, 0.0), 1.0);
        assert!(super::pow(-8.0, 1.0 / 3.0).is_nan());
        let ewma = super::pow(1.0 - 0.1, 7.0);
        assert!((ewma - 0.478_296_9).abs() < 1e-9, "{ewma}");
    }
}
