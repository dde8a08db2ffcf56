//! Exponential backoff with full jitter: the wait before retry `n` is uniform in
//! `[0, min(max, initial · 2ⁿ⁻¹)]`, bounded in attempts and in time since the first failure.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// The retry budget of a pipeline.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: RetryConfig,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Self { config }
    }

    /// The cap of the wait before the retry that follows attempt `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let ms = self
            .config
            .initial_backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.max_backoff_ms);
        Duration::from_millis(ms)
    }

    /// A random wait in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }

    /// May another attempt start, after `attempts_made` attempts and `since_first_failure`?
    pub fn allows(
        &self,
        attempts_made: u32,
        since_first_failure: Duration,
        next_delay: Duration,
    ) -> bool {
        attempts_made < self.config.max_attempts
            && since_first_failure + next_delay <= Duration::from_millis(self.config.max_elapsed_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(RetryConfig {
            max_attempts: 4,
            initial_backoff_ms: 100,
            max_backoff_ms: 350,
            max_elapsed_ms: 1_000,
            topic: None,
        })
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = backoff();
        let ceilings: Vec<u64> = (1..=4).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, vec![100, 200, 350, 350]);
    }

    #[test]
    fn delays_stay_within_the_ceiling() {
        let b = backoff();
        for attempt in 1..=4 {
            for _ in 0..100 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
    }

    #[test]
    fn budget_bounds_attempts_and_time() {
        let b = backoff();
        assert!(b.allows(3, Duration::ZERO, Duration::ZERO));
        assert!(!b.allows(4, Duration::ZERO, Duration::ZERO));
        assert!(!b.allows(1, Duration::from_millis(900), Duration::from_millis(200)));
    }
}
