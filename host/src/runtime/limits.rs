//! The memory cap of one instance. It remembers that it refused to grow memory, so a guest
//! that aborts after a failed `memory.grow` is classed `oom`, not `trap`.

use wasmtime::ResourceLimiter;

#[derive(Debug)]
pub struct MemoryCap {
    cap_bytes: usize,
    denied: bool,
    peak_bytes: usize,
}

impl MemoryCap {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            cap_bytes,
            denied: false,
            peak_bytes: 0,
        }
    }

    /// The largest linear memory this instance was allowed to have.
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    /// Did the instance ask for more memory than the cap since the last call to `reset`?
    pub fn denied(&self) -> bool {
        self.denied
    }

    pub fn reset(&mut self) {
        self.denied = false;
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold 8-byte references: cap them at the same byte budget.
        if desired.saturating_mul(8) > self.cap_bytes {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_cap_is_refused_and_remembered() {
        let mut cap = MemoryCap::new(1 << 20);
        assert!(cap.memory_growing(0, 1 << 19, None).expect("ok"));
        assert!(!cap.denied());
        assert_eq!(cap.peak_bytes(), 1 << 19);
        assert!(!cap.memory_growing(1 << 19, 2 << 20, None).expect("ok"));
        assert!(cap.denied());
        cap.reset();
        assert!(!cap.denied());
    }
}
