//! What every criterion bench of eddy shares: its configuration, short under
//! `EDDY_BENCH_QUICK` (for CI), full otherwise.

use std::time::Duration;

use criterion::Criterion;

/// Shorter runs when `EDDY_BENCH_QUICK` is set, criterion's usual shape otherwise.
pub fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("EDDY_BENCH_QUICK").is_some() {
        c.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(500))
    } else {
        c.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4))
    }
}
