//! Hints to the processor's caches.

/// A hint to load the cache line of `value`; no effect on what the program computes.
#[inline]
pub(crate) fn prefetch<T>(value: &T) {
    // SAFETY: a prefetch reads nothing the program can observe and never faults; the
    // pointer comes from a live reference anyway.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
