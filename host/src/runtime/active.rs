//! The version of a plugin a pipeline runs now, swappable while it runs (hot swap), and an
//! optional canary: a candidate version that gets a fixed share of the records, chosen by a
//! stable hash of each record's id. Each batch takes a [`Routing`] when its transform starts
//! and finishes on it, retries included; the next batch takes whatever is current then.

use std::sync::{Arc, PoisonError, RwLock};

use super::Plugin;

/// The versions one batch runs on.
#[derive(Clone)]
pub struct Routing {
    pub stable: Arc<Plugin>,
    pub canary: Option<Canary>,
}

/// A candidate version and the share of records it gets.
#[derive(Clone)]
pub struct Canary {
    pub plugin: Arc<Plugin>,
    /// 0 to 100.
    pub percent: f64,
}

impl Canary {
    /// Whether the record with this id goes to the candidate.
    pub fn takes(&self, id: &str) -> bool {
        in_share(id, self.percent)
    }
}

/// Whether `id` falls in the first `percent` of the id space: the same id always does (or
/// never does) for one percentage, on every worker and run.
fn in_share(id: &str, percent: f64) -> bool {
    // FNV-1a 64: fixed forever, unlike the standard library's hashers.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    ((hash % 10_000) as f64) < percent * 100.0
}

pub struct ActivePlugin {
    routing: RwLock<Routing>,
    /// True while the stable version is quarantined with nothing to fall back to: batches
    /// wait (none are lost) until another version is swapped in.
    paused: tokio::sync::watch::Sender<bool>,
}

impl ActivePlugin {
    pub fn new(plugin: Plugin) -> Self {
        Self {
            routing: RwLock::new(Routing {
                stable: Arc::new(plugin),
                canary: None,
            }),
            paused: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Returns once records may run (at once, unless the plugin is paused).
    pub async fn serving(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives as long as `self`, so this only ends when unpaused.
        let _ = paused.wait_for(|paused| !paused).await;
    }

    /// Stops records from running until a version is swapped in.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// The versions to run the next batch on.
    pub fn routing(&self) -> Routing {
        self.routing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The stable version (what most records run on).
    pub fn current(&self) -> Arc<Plugin> {
        self.routing().stable
    }

    /// Makes `plugin` the stable version and ends any canary; returns the version it
    /// replaces (batches already on it finish on it).
    pub fn swap(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        let mut routing = self.routing.write().unwrap_or_else(PoisonError::into_inner);
        routing.canary = None;
        let old = std::mem::replace(&mut routing.stable, plugin);
        self.paused.send_replace(false);
        old
    }

    /// Sends `percent` of the records to `plugin` from the next batch on.
    pub fn start_canary(&self, plugin: Arc<Plugin>, percent: f64) {
        let mut routing = self.routing.write().unwrap_or_else(PoisonError::into_inner);
        routing.canary = Some(Canary { plugin, percent });
    }

    /// Ends the canary: every record runs on the stable version again.
    pub fn end_canary(&self) -> Option<Canary> {
        let mut routing = self.routing.write().unwrap_or_else(PoisonError::into_inner);
        routing.canary.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_takes_its_share_of_ids_and_always_the_same_ones() {
        let share = |percent: f64| {
            (0..20_000)
                .filter(|i| in_share(&format!("id-{i}"), percent))
                .count()
        };
        let ten = share(10.0);
        assert!((1_600..=2_400).contains(&ten), "{ten} of 20000 at 10 %");
        assert_eq!(share(0.0), 0);
        assert_eq!(share(100.0), 20_000);
        // A larger share keeps every id of a smaller one.
        let at = |p| {
            (0..2_000)
                .filter(|i| in_share(&format!("id-{i}"), p))
                .collect::<Vec<_>>()
        };
        assert!(at(5.0).iter().all(|i| at(20.0).contains(i)));
    }
}
