//! Plugin log lines kept for the trace of the call that wrote them, besides going to the
//! host's log: a plugin call runs on one thread, so the lines are kept per thread while
//! [`keeping_log_lines`] runs.

use std::cell::RefCell;
use std::time::SystemTime;

use super::Level;

/// Most lines kept per call (a span keeps 128 events); the rest are counted.
const MAX_KEPT: usize = 128;
/// Longest message kept, in bytes.
const MAX_MESSAGE: usize = 4096;

thread_local! {
    static KEPT: RefCell<Option<LogLines>> = const { RefCell::new(None) };
}

/// One line a plugin logged.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub at: SystemTime,
    pub level: &'static str,
    pub message: String,
}

/// The lines of a call, and how many more it wrote.
#[derive(Debug, Default)]
pub struct LogLines {
    pub lines: Vec<LogLine>,
    pub dropped: u64,
}

/// Runs `f` (plugin calls) and returns its result with the lines plugins logged meanwhile
/// on this thread.
pub fn keeping_log_lines<R>(f: impl FnOnce() -> R) -> (R, LogLines) {
    let outer = KEPT.with(|kept| kept.borrow_mut().replace(LogLines::default()));
    let result = f();
    let lines = KEPT.with(|kept| std::mem::replace(&mut *kept.borrow_mut(), outer));
    (result, lines.unwrap_or_default())
}

/// Keeps a line if [`keeping_log_lines`] runs on this thread.
pub(super) fn keep(level: Level, message: &str) {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        let Some(kept) = kept.as_mut() else { return };
        if kept.lines.len() >= MAX_KEPT {
            kept.dropped += 1;
            return;
        }
        let mut end = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        kept.lines.push(LogLine {
            at: SystemTime::now(),
            level: match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            },
            message: message[..end].to_owned(),
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_only_while_asked_for_and_capped() {
        keep(Level::Info, "before");
        let ((), kept) = keeping_log_lines(|| {
            keep(Level::Warn, "one");
            for _ in 0..MAX_KEPT + 9 {
                keep(Level::Debug, &"é".repeat(MAX_MESSAGE));
            }
        });
        assert_eq!(kept.lines.len(), MAX_KEPT);
        assert_eq!(kept.dropped, 10);
        assert_eq!(
            (kept.lines[0].level, kept.lines[0].message.as_str()),
            ("warn", "one")
        );
        assert!(kept.lines[1].message.len() <= MAX_MESSAGE);
        let ((), after) = keeping_log_lines(|| ());
        assert!(after.lines.is_empty());
    }
}
