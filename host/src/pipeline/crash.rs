//! Crash-loop protection (embedded mode): which records were in the plugin when the worker
//! died, and how often. Before each plugin call the ids it runs are written to
//! `<dir>/in-plugin`, and the file is emptied after the call; a `kill -9` or an abort does not
//! lose that write (the kernel holds it). At start, each id found there counts one crash in
//! `<dir>/crashes.json`. A record with a crash runs alone, so a next crash names it and not
//! its batch; one with `pipeline.crash_loop_limit` crashes is dead-lettered as `crash_loop`
//! instead of running again (its count stays, but its done mark keeps it from coming back).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// The test hook: a worker started with this variable set to an id aborts when that record
/// enters the plugin, as a plugin that took the host down would.
pub const ABORT_ON_ID_ENV: &str = "WEIR_TEST_ABORT_ON_ID";

/// The note's length header when no record is in the plugin: the bytes of ids that follow.
const EMPTY: &str = "0000000000\n";

/// The ids of a note: as many bytes as its header says, one id per line.
fn noted_ids(note: &str) -> Vec<&str> {
    let Some((length, rest)) = note.split_once('\n') else {
        return Vec::new();
    };
    let length = length.parse::<usize>().unwrap_or(0).min(rest.len());
    rest.get(..length)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .collect()
}

#[derive(Debug)]
pub struct CrashGuard {
    dir: PathBuf,
    in_plugin: std::fs::File,
    crashes: Mutex<HashMap<String, u32>>,
    limit: u32,
    abort_on: Option<String>,
}

impl CrashGuard {
    /// Opens the guard's files in `dir`, counting the crash of the last run if it died with
    /// records in the plugin.
    pub fn open(dir: &Path, limit: u32) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut crashes: HashMap<String, u32> = match std::fs::read(dir.join("crashes.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        let died_with = std::fs::read_to_string(dir.join("in-plugin")).unwrap_or_default();
        let died_with = noted_ids(&died_with);
        if !died_with.is_empty() {
            for id in &died_with {
                *crashes.entry((*id).to_owned()).or_default() += 1;
            }
            eprintln!(
                "weir: the last run died with {} record(s) in the plugin (e.g. {}); they run one \
                 by one now, and a record the worker dies on {limit} times is dead-lettered as \
                 crash_loop",
                died_with.len(),
                died_with[0]
            );
        }
        let guard = Self {
            dir: dir.to_owned(),
            in_plugin: std::fs::File::create(dir.join("in-plugin"))?,
            crashes: Mutex::new(crashes),
            limit,
            abort_on: std::env::var(ABORT_ON_ID_ENV).ok(),
        };
        guard.save()?;
        Ok(guard)
    }

    fn crashes(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.crashes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self) -> std::io::Result<()> {
        let json = serde_json::to_vec(&*self.crashes()).map_err(std::io::Error::other)?;
        let path = self.dir.join("crashes.json");
        let tmp = path.with_extension("tmp");
        std::fs::File::create(&tmp)?.write_all(&json)?;
        std::fs::rename(tmp, path)
    }

    /// Times the worker died while this record was in the plugin.
    pub fn crashes_of(&self, id: &str) -> u32 {
        self.crashes().get(id).copied().unwrap_or(0)
    }

    /// Whether the record is to be dead-lettered instead of run.
    pub fn looping(&self, id: &str) -> Option<u32> {
        let n = self.crashes_of(id);
        (n >= self.limit).then_some(n)
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Notes that these records are about to enter the plugin: one write, of a length
    /// header and the ids (what follows from an earlier, longer note is ignored).
    pub fn enter<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> std::io::Result<()> {
        let mut text = String::from(EMPTY);
        let mut abort = false;
        for id in ids {
            abort |= self.abort_on.as_deref() == Some(id);
            text.push_str(id);
            text.push('\n');
        }
        let header = format!(
            "{:0width$}\n",
            text.len() - EMPTY.len(),
            width = EMPTY.len() - 1
        );
        text.replace_range(..EMPTY.len(), &header);
        self.in_plugin.write_all_at(text.as_bytes(), 0)?;
        if abort {
            eprintln!("weir: {ABORT_ON_ID_ENV} names a record entering the plugin: aborting");
            std::process::abort();
        }
        Ok(())
    }

    /// Notes that the records left the plugin alive; those that had crashes are cleared.
    pub fn leave<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> std::io::Result<()> {
        self.in_plugin.write_all_at(EMPTY.as_bytes(), 0)?;
        let cleared = {
            let mut crashes = self.crashes();
            let before = crashes.len();
            for id in ids {
                crashes.remove(id);
            }
            crashes.len() != before
        };
        if cleared { self.save() } else { Ok(()) }
    }

    /// Whether any record has crashes (and so runs alone).
    pub fn any_suspect<'a>(&self, mut ids: impl Iterator<Item = &'a str>) -> bool {
        let crashes = self.crashes();
        !crashes.is_empty() && ids.any(|id| crashes.contains_key(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_in_the_plugin_at_a_crash_counts_until_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let guard = CrashGuard::open(dir.path(), 2).expect("open");
        guard.enter(["a-long-id", "b"]).expect("enter");
        guard.leave(std::iter::empty()).expect("leave");
        guard.enter(["a", "b"]).expect("enter"); // shorter than the note before
        drop(guard); // died with a and b in the plugin
        let guard = CrashGuard::open(dir.path(), 2).expect("open");
        assert_eq!((guard.crashes_of("a"), guard.crashes_of("b")), (1, 1));
        assert_eq!(
            guard.crashes_of("a-long-id"),
            0,
            "a note left the plugin alive"
        );
        assert!(guard.any_suspect(["x", "b"].into_iter()));
        guard.enter(["b"]).expect("enter");
        guard.leave(["b"]).expect("leave"); // b ran alone and lived: cleared
        guard.enter(["a"]).expect("enter");
        drop(guard); // died on a again
        let guard = CrashGuard::open(dir.path(), 2).expect("open");
        assert_eq!((guard.crashes_of("a"), guard.crashes_of("b")), (2, 0));
        assert_eq!(guard.looping("a"), Some(2));
        assert_eq!(guard.looping("b"), None);
    }
}
