//! Per-operation latency counters of a client (PyTorch's
//! `collectClientCounters`): count, mean and sample variance, by Welford's
//! online algorithm.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

/// The latency statistics of one operation.
#[derive(Debug, Clone, PartialEq)]
pub struct OpCounter {
    /// The operation ("set", "get", ...).
    pub op: &'static str,
    /// How many times it ran.
    pub count: u64,
    /// Mean latency, in milliseconds.
    pub mean_ms: f64,
    /// Sample variance of the latency, in ms² (0 below two samples).
    pub variance_ms: f64,
}

#[derive(Default, Clone, Copy)]
struct Welford {
    count: u64,
    mean: f64,
    m2: f64,
}

/// Thread-safe counters, one per operation.
#[derive(Default)]
pub(crate) struct Counters {
    by_op: Mutex<BTreeMap<&'static str, Welford>>,
}

impl Counters {
    pub(crate) fn record(&self, op: &'static str, elapsed: Duration) {
        let x = elapsed.as_secs_f64() * 1e3;
        let mut by_op = self.by_op.lock();
        let w = by_op.entry(op).or_default();
        w.count += 1;
        let delta = x - w.mean;
        w.mean += delta / w.count as f64;
        w.m2 += delta * (x - w.mean);
    }

    pub(crate) fn snapshot(&self) -> Vec<OpCounter> {
        self.by_op
            .lock()
            .iter()
            .map(|(op, w)| OpCounter {
                op,
                count: w.count,
                mean_ms: w.mean,
                variance_ms: if w.count > 1 {
                    w.m2 / (w.count - 1) as f64
                } else {
                    0.0
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_variance() {
        let c = Counters::default();
        for ms in [1, 2, 3, 4] {
            c.record("get", Duration::from_millis(ms));
        }
        let s = c.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].op, s[0].count), ("get", 4));
        assert!((s[0].mean_ms - 2.5).abs() < 1e-9);
        assert!((s[0].variance_ms - 5.0 / 3.0).abs() < 1e-9);
    }
}
