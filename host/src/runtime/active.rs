//! The version of a plugin a pipeline runs now, swappable while it runs (hot swap): each
//! batch takes the current version when its transform starts and finishes on it, retries
//! included; the next batch takes whatever is current then.

use std::sync::{Arc, PoisonError, RwLock};

use super::Plugin;

pub struct ActivePlugin {
    current: RwLock<Arc<Plugin>>,
}

impl ActivePlugin {
    pub fn new(plugin: Plugin) -> Self {
        Self {
            current: RwLock::new(Arc::new(plugin)),
        }
    }

    /// The version to run the next batch on.
    pub fn current(&self) -> Arc<Plugin> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `plugin` current; returns the version it replaces (batches already on it
    /// finish on it).
    pub fn swap(&self, plugin: Plugin) -> Arc<Plugin> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, Arc::new(plugin))
    }
}
