//! Crash-loop protection: which records a worker died with in the plugin, and how often. A
//! record with a crash runs alone, so a next crash names it and not its batch; one with
//! `pipeline.crash_loop_limit` crashes is dead-lettered as `crash_loop` instead of running
//! again (its count stays, but its done mark keeps it from coming back).
//!
//! Before a plugin call the ids it runs are noted in a [`CrashLog`], and the note is cleared
//! after the call; a `kill -9` or an abort leaves it behind, and each id in it counts one
//! crash.
//!
//! - Embedded mode notes every batch, in [`CrashFiles`] in the state directory (two small
//!   writes per batch).
//! - Cluster mode notes in Redis, where the worker that takes over a dead one's records
//!   sees them, but only the batches of records a worker died with *in flight* (claimed, not
//!   finished: the state store counts those in its claims at no extra round trip). Those run
//!   one record at a time and are noted. So the first death a record causes is not noted
//!   record by record: it counts one crash for every record the dead worker had in flight.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use crate::state::{CrashLog, StateError};

/// The test hook: a worker started with this variable set to an id aborts when that record
/// enters the plugin, as a plugin that took the host down would.
pub const ABORT_ON_ID_ENV: &str = "WEIR_TEST_ABORT_ON_ID";

/// A crash log, when to note in it, and the limit of crashes after which a record is not
/// run again.
pub struct CrashGuard {
    log: Arc<dyn CrashLog>,
    limit: u32,
    /// Every batch is noted (embedded mode); else only the records of a dead worker.
    note_every_batch: bool,
    abort_on: Option<String>,
}

impl CrashGuard {
    pub fn new(log: Arc<dyn CrashLog>, limit: u32, note_every_batch: bool) -> Self {
        Self {
            log,
            limit,
            note_every_batch,
            abort_on: std::env::var(ABORT_ON_ID_ENV).ok(),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Per record, the crashes to judge it by. `in_flight`: per record, the workers that
    /// died with it in flight, from the state store's claims (zeros where it does not count).
    pub async fn crashes(&self, ids: &[&str], in_flight: &[u32]) -> Result<Vec<u32>, StateError> {
        if ids.is_empty() || (!self.note_every_batch && in_flight.iter().all(|&n| n == 0)) {
            return Ok(vec![0; ids.len()]);
        }
        let noted = self.log.crashes(ids).await?;
        if noted.len() != ids.len() {
            return Err(StateError::new(format!(
                "the crash log answered {} of {} ids",
                noted.len(),
                ids.len()
            )));
        }
        if self.note_every_batch {
            return Ok(noted);
        }
        // The death that first put a record in doubt was not noted record by record.
        Ok(noted
            .iter()
            .zip(in_flight)
            .map(|(&noted, &in_flight)| noted + u32::from(in_flight > 0))
            .collect())
    }

    /// Notes, when this guard notes them (`alone`: the record of a dead worker's batch runs
    /// by itself), that these records enter the plugin; aborts the process if the test hook
    /// names one of them.
    pub async fn enter(&self, ids: &[&str], alone: bool) -> Result<(), StateError> {
        if self.note_every_batch || alone {
            self.log.enter(ids).await?;
        }
        if let Some(id) = &self.abort_on
            && ids.contains(&id.as_str())
        {
            eprintln!("weir: {ABORT_ON_ID_ENV} names a record entering the plugin: aborting");
            std::process::abort();
        }
        Ok(())
    }

    /// Notes that these records left the plugin alive (as [`Self::enter`] noted them).
    pub async fn leave(&self, ids: &[&str], alone: bool) -> Result<(), StateError> {
        if self.note_every_batch || alone {
            self.log.leave(ids).await?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CrashGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashGuard")
            .field("limit", &self.limit)
            .field("note_every_batch", &self.note_every_batch)
            .finish_non_exhaustive()
    }
}

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

/// The crash log of embedded mode, in a directory: `in-plugin` holds the ids in the plugin
/// (one write per call; the kernel keeps it through a `kill -9` or an abort) and
/// `crashes.json` the counts. The note a dead run left is counted when the log is opened.
#[derive(Debug)]
pub struct CrashFiles {
    dir: PathBuf,
    in_plugin: std::fs::File,
    crashes: Mutex<HashMap<String, u32>>,
}

fn io_error(e: std::io::Error) -> StateError {
    StateError::caused_by("crash log", e)
}

impl CrashFiles {
    /// Opens the log's files in `dir`, counting the crash of the last run if it died with
    /// records in the plugin.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
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
                 by one now, and a record the worker dies on too often is dead-lettered as \
                 crash_loop",
                died_with.len(),
                died_with[0]
            );
        }
        let log = Self {
            dir: dir.to_owned(),
            in_plugin: std::fs::File::create(dir.join("in-plugin"))?,
            crashes: Mutex::new(crashes),
        };
        log.save()?;
        Ok(log)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.crashes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn save(&self) -> std::io::Result<()> {
        let json = serde_json::to_vec(&*self.counts()).map_err(std::io::Error::other)?;
        let path = self.dir.join("crashes.json");
        let tmp = path.with_extension("tmp");
        std::fs::File::create(&tmp)?.write_all(&json)?;
        std::fs::rename(tmp, path)
    }
}

#[async_trait]
impl CrashLog for CrashFiles {
    async fn crashes(&self, ids: &[&str]) -> Result<Vec<u32>, StateError> {
        let counts = self.counts();
        Ok(ids
            .iter()
            .map(|id| counts.get(*id).copied().unwrap_or(0))
            .collect())
    }

    /// One write, of a length header and the ids (what follows from an earlier, longer note
    /// is ignored).
    async fn enter(&self, ids: &[&str]) -> Result<(), StateError> {
        let mut text = String::from(EMPTY);
        for id in ids {
            text.push_str(id);
            text.push('\n');
        }
        let header = format!(
            "{:0width$}\n",
            text.len() - EMPTY.len(),
            width = EMPTY.len() - 1
        );
        text.replace_range(..EMPTY.len(), &header);
        self.in_plugin
            .write_all_at(text.as_bytes(), 0)
            .map_err(io_error)
    }

    async fn leave(&self, ids: &[&str]) -> Result<(), StateError> {
        self.in_plugin
            .write_all_at(EMPTY.as_bytes(), 0)
            .map_err(io_error)?;
        let cleared = {
            let mut counts = self.counts();
            let before = counts.len();
            if before > 0 {
                for id in ids {
                    counts.remove(*id);
                }
            }
            counts.len() != before
        };
        if cleared {
            self.save().map_err(io_error)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_in_the_plugin_at_a_crash_counts_until_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counts = |log: &CrashFiles| {
            let counts = log.counts();
            ["a", "b", "a-long-id"].map(|id| counts.get(id).copied().unwrap_or(0))
        };
        let log = CrashFiles::open(dir.path()).expect("open");
        log.enter(&["a-long-id", "b"]).await.expect("enter");
        log.leave(&["a-long-id", "b"]).await.expect("leave");
        log.enter(&["a", "b"]).await.expect("enter"); // shorter than the note before
        drop(log); // died with a and b in the plugin
        let log = CrashFiles::open(dir.path()).expect("open");
        assert_eq!(counts(&log), [1, 1, 0], "a note left the plugin alive");
        assert_eq!(log.crashes(&["x", "b"]).await.expect("crashes"), [0, 1]);
        log.enter(&["b"]).await.expect("enter");
        log.leave(&["b"]).await.expect("leave"); // b ran alone and lived: cleared
        log.enter(&["a"]).await.expect("enter");
        drop(log); // died on a again
        let log = CrashFiles::open(dir.path()).expect("open");
        assert_eq!(counts(&log), [2, 0, 0]);
    }
}
