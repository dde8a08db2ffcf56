//! The embedded state store: done marks in a redb database under a local directory.
//!
//! One process owns the directory (redb locks the file), so every claim is granted; the
//! fencing token is a counter raised once per opening, so outputs of later runs carry higher
//! fences.
//!
//! Plugins' keyed state lives in the same database, one table per pipeline and plugin name
//! (`keyed:<pipeline>/<plugin>`: partition and key → expiry and value), and its writes go
//! into the same transactions as the done marks of their records.
//!
//! The same transactions record how long each output and dead-letter file is once the
//! batches they mark done are written; on start, [`EmbeddedStore::cut_back`] cuts a file
//! back to that length, so lines of batches never marked done are written once, by the
//! rerun. (A file shorter than recorded is left as it is.)
//!
//! Done marks are written by one thread with group commit: every batch waiting to be marked
//! when a write transaction starts goes into it, so a busy pipeline pays one commit (and one
//! `fsync`) for several batches instead of queueing its batches behind redb's single writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::keyed::{
    KeyedEntry, KeyedRead, KeyedWrite, decode_value, encode_value, partition_key,
    split_partition_key,
};
use super::{Claim, Commit, StateError, StateStore, Turn};
use crate::clock::now_ms;
use crate::sink::FileLength;

/// The done marks of one pipeline: a table named `done:<pipeline>`, record id (its bytes:
/// no UTF-8 check on every comparison) → expiry in ms since the epoch (0: never expires).
type DoneTable<'a> = TableDefinition<'a, &'static [u8], u64>;
/// Plugins' keyed state: partition and key → expiry and value (`state::keyed`).
type KeyedTable<'a> = TableDefinition<'a, &'static [u8], &'static [u8]>;
/// Small counters (the fence).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The committed length of each output and dead-letter file (absolute path → bytes).
const FILES: TableDefinition<&str, u64> = TableDefinition::new("files");

/// A file's key in [`FILES`]: its absolute path.
fn file_key(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// Done marks in a local redb database.
pub struct EmbeddedStore {
    db: Arc<Database>,
    fence: u64,
    done_ttl: Option<Duration>,
    /// The name of the pipeline's table of done marks.
    table: Arc<str>,
    /// The name of the table of the plugin's keyed state, once [`EmbeddedStore::keep_keyed_state`] named it.
    keyed_table: Option<Arc<str>>,
    marker: Option<Marker>,
}

/// Ids to mark done with one expiry, and where to say that they are durable.
struct Marks {
    ids: Vec<String>,
    expiry: u64,
    /// Keyed-state writes of those ids' records, in order, and their table.
    writes: Vec<KeyedWrite>,
    keyed_table: Option<Arc<str>>,
    /// The lengths of the files the ids' outputs went to.
    files: Vec<FileLength>,
    durable: tokio::sync::oneshot::Sender<Result<(), Arc<redb::Error>>>,
}

/// The thread that writes done marks (see the module docs).
struct Marker {
    marks: mpsc::Sender<Marks>,
    thread: JoinHandle<()>,
}

impl Marker {
    fn start(db: Arc<Database>, table: Arc<str>) -> Result<Self, StateError> {
        let (marks, waiting) = mpsc::channel::<Marks>();
        let thread = std::thread::Builder::new()
            .name("weir-state".into())
            .spawn(move || {
                while let Ok(first) = waiting.recv() {
                    let mut group = vec![first];
                    group.extend(waiting.try_iter());
                    let written =
                        write_marks(&db, DoneTable::new(&table), &group).map_err(Arc::new);
                    for marks in group {
                        // A caller that gave up waiting needs no answer.
                        let _ = marks.durable.send(written.clone());
                    }
                }
            })
            .map_err(|e| StateError::caused_by("cannot start the state writer thread", e))?;
        Ok(Self { marks, thread })
    }
}

/// One write transaction for every id of `group`.
fn write_marks(db: &Database, done: DoneTable<'_>, group: &[Marks]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    if group.iter().any(|marks| !marks.files.is_empty()) {
        let mut files = txn.open_table(FILES)?;
        for length in group.iter().flat_map(|marks| &marks.files) {
            files.insert(file_key(&length.path).as_str(), length.length)?;
        }
    }
    {
        let mut table = txn.open_table(done)?;
        for marks in group {
            for id in &marks.ids {
                table.insert(id.as_bytes(), marks.expiry)?;
            }
        }
    }
    for marks in group {
        let Some(name) = marks
            .keyed_table
            .as_deref()
            .filter(|_| !marks.writes.is_empty())
        else {
            continue;
        };
        let mut table = txn.open_table(KeyedTable::new(name))?;
        for write in &marks.writes {
            let key = partition_key(write.partition, &write.key);
            match &write.value {
                Some(value) => {
                    table.insert(
                        key.as_slice(),
                        encode_value(value, write.expires_ms).as_slice(),
                    )?;
                }
                None => {
                    table.remove(key.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

impl Drop for EmbeddedStore {
    /// Waits for the marks already handed over, so the database is closed on return.
    fn drop(&mut self) {
        if let Some(Marker { marks, thread }) = self.marker.take() {
            drop(marks);
            let _ = thread.join();
        }
    }
}

fn err(context: &str) -> impl Fn(redb::Error) -> StateError + '_ {
    move |e| StateError::caused_by(context, e)
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`. Marks are kept per `namespace` (the pipeline
    /// name), in a table of its own; `done_ttl` of `None` keeps them forever.
    pub fn open(
        dir: &Path,
        namespace: &str,
        done_ttl: Option<Duration>,
        cache_bytes: usize,
    ) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StateError::caused_by(
                format!("cannot create state directory {}", dir.display()),
                e,
            )
        })?;
        let file = dir.join("weir.redb");
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&file)
            .map_err(|e| {
                StateError::caused_by(
                    format!(
                        "cannot open {} (is another weir process using this state directory?)",
                        file.display()
                    ),
                    e,
                )
            })?;
        let table: Arc<str> = format!("done:{namespace}").into();
        let txn = db.begin_write().map_err(|e| err("begin")(e.into()))?;
        let fence = {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| err("open meta")(e.into()))?;
            txn.open_table(DoneTable::new(&table))
                .map_err(|e| err("open done")(e.into()))?;
            let fence = meta
                .get("fence")
                .map_err(|e| err("read fence")(e.into()))?
                .map_or(0, |v| v.value())
                + 1;
            meta.insert("fence", fence)
                .map_err(|e| err("write fence")(e.into()))?;
            fence
        };
        txn.commit().map_err(|e| err("commit")(e.into()))?;
        let db = Arc::new(db);
        Ok(Self {
            marker: Some(Marker::start(db.clone(), table.clone())?),
            db,
            fence,
            done_ttl,
            table,
            keyed_table: None,
        })
    }

    /// Cuts each file back to the length recorded with the last done marks (what batches
    /// wrote after them was never marked done, and their records run again), and records
    /// the length of a file seen for the first time. Returns what was cut, to say so.
    /// Call it before the files are opened for writing.
    pub fn cut_back(&self, paths: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>, StateError> {
        let txn = self.db.begin_write().map_err(|e| err("begin")(e.into()))?;
        let mut cut = Vec::new();
        {
            let mut files = txn
                .open_table(FILES)
                .map_err(|e| err("open files")(e.into()))?;
            for path in paths.iter().filter(|p| p.as_os_str() != "-") {
                let key = file_key(path);
                let on_disk = std::fs::metadata(path).map_or(0, |m| m.len());
                let committed = (files.get(key.as_str()))
                    .map_err(|e| err("read files")(e.into()))?
                    .map(|v| v.value());
                match committed {
                    Some(length) if on_disk > length => {
                        let file = std::fs::OpenOptions::new().write(true).open(path);
                        file.and_then(|f| f.set_len(length).and_then(|()| f.sync_all()))
                            .map_err(|e| {
                                StateError::caused_by(
                                    format!("cannot cut back {}", path.display()),
                                    e,
                                )
                            })?;
                        cut.push((path.clone(), on_disk - length));
                    }
                    Some(_) => {}
                    None => {
                        files
                            .insert(key.as_str(), on_disk)
                            .map_err(|e| err("write files")(e.into()))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err("commit")(e.into()))?;
        Ok(cut)
    }

    /// Keeps the keyed state of the plugin named `plugin` (with the done marks' pipeline).
    pub fn keep_keyed_state(mut self, plugin: &str) -> Self {
        let pipeline = self.table.trim_start_matches("done:");
        self.keyed_table = Some(keyed_table(pipeline, plugin).into());
        self
    }
}

/// The live keyed state of `plugin` in `pipeline`, read from the database in `dir` without
/// taking it over (`weir state`); entries in key order, one partition after another.
pub fn read_keyed_state(
    dir: &Path,
    pipeline: &str,
    plugin: &str,
) -> Result<Vec<KeyedEntry>, StateError> {
    let file = dir.join("weir.redb");
    if !file.is_file() {
        return Err(StateError::new(format!(
            "no state database at {}",
            file.display()
        )));
    }
    let db = redb::ReadOnlyDatabase::open(&file).map_err(|e| {
        StateError::caused_by(
            format!(
                "cannot open {} (a running worker holds it: ask its API, `GET /v1/state`)",
                file.display()
            ),
            e,
        )
    })?;
    entries(&db, &keyed_table(pipeline, plugin))
}

/// The name of the table of `plugin`'s keyed state in `pipeline`.
fn keyed_table(pipeline: &str, plugin: &str) -> String {
    format!("keyed:{pipeline}/{plugin}")
}

/// The live entries of the keyed-state table `name`, in key order.
fn entries(db: &impl ReadableDatabase, name: &str) -> Result<Vec<KeyedEntry>, StateError> {
    let txn = db.begin_read().map_err(|e| err("begin read")(e.into()))?;
    let table = match txn.open_table(KeyedTable::new(name)) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(err("open keyed state")(e.into())),
    };
    let now = now_ms() as u64;
    let mut entries = Vec::new();
    for item in table
        .iter()
        .map_err(|e| err("read keyed state")(e.into()))?
    {
        let (key, value) = item.map_err(|e| err("read keyed state")(e.into()))?;
        let (Some((partition, key)), Some(value)) = (
            split_partition_key(key.value()),
            decode_value(value.value(), now),
        ) else {
            continue;
        };
        entries.push(KeyedEntry {
            partition,
            key: key.to_vec(),
            value: value.to_vec(),
        });
    }
    Ok(entries)
}

/// Reads one plugin's keyed state from the database.
struct EmbeddedKeyed {
    db: Arc<Database>,
    table: Arc<str>,
}

impl KeyedRead for EmbeddedKeyed {
    fn get(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let txn = (self.db.begin_read()).map_err(|e| err("begin read")(e.into()))?;
        let table = match txn.open_table(KeyedTable::new(&self.table)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err("open keyed state")(e.into())),
        };
        let stored = table
            .get(partition_key(partition, key).as_slice())
            .map_err(|e| err("read keyed state")(e.into()))?;
        Ok(stored.and_then(|v| decode_value(v.value(), now_ms() as u64).map(<[u8]>::to_vec)))
    }

    fn entries(&self) -> Result<Vec<KeyedEntry>, StateError> {
        entries(self.db.as_ref(), &self.table)
    }

    fn sole_writer(&self) -> bool {
        true
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn claim(&self, ids: &[String]) -> Result<Vec<Claim>, StateError> {
        let ids = ids.to_vec();
        let (db, fence, table) = (self.db.clone(), self.fence, self.table.clone());
        run_blocking(move || {
            let txn = db.begin_read().map_err(|e| err("begin read")(e.into()))?;
            let done = txn
                .open_table(DoneTable::new(&table))
                .map_err(|e| err("open done")(e.into()))?;
            let now = now_ms() as u64;
            ids.iter()
                .map(|id| {
                    let expiry = done
                        .get(id.as_bytes())
                        .map_err(|e| err("read done")(e.into()))?;
                    Ok(match expiry.map(|v| v.value()) {
                        Some(0) => Claim::Done,
                        Some(expiry) if expiry > now => Claim::Done,
                        _ => Claim::Leased { fence, crashes: 0 },
                    })
                })
                .collect()
        })
        .await
    }

    async fn finish(&self, done: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        self.finish_with(done, Commit::default(), Turn::free())
            .await
    }

    async fn finish_with(
        &self,
        done: &[(String, u64)],
        with: Commit,
        mut turn: Turn,
    ) -> Result<Vec<bool>, StateError> {
        let Commit { writes, files, .. } = with;
        if !writes.is_empty() && self.keyed_table.is_none() {
            return Err(StateError::new(
                "keyed-state writes for a store opened without keep_keyed_state",
            ));
        }
        let expiry = self
            .done_ttl
            .map_or(0, |ttl| now_ms() as u64 + ttl.as_millis() as u64);
        let (durable, written) = tokio::sync::oneshot::channel();
        let marks = Marks {
            ids: done.iter().map(|(id, _)| id.clone()).collect(),
            expiry,
            writes,
            keyed_table: self.keyed_table.clone(),
            files,
            durable,
        };
        let stopped = || StateError::new("the state writer thread has stopped");
        let marker = self.marker.as_ref().ok_or_else(stopped)?;
        turn.wait().await;
        marker.marks.send(marks).map_err(|_| stopped())?;
        // The writer thread takes marks in the order they are sent: the next batch may go.
        drop(turn);
        written
            .await
            .map_err(|_| stopped())?
            .map_err(|e| StateError::caused_by("mark done", e))?;
        Ok(vec![true; done.len()])
    }

    fn keyed(&self) -> Option<Arc<dyn KeyedRead>> {
        let table = self.keyed_table.clone()?;
        Some(Arc::new(EmbeddedKeyed {
            db: self.db.clone(),
            table,
        }))
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::caused_by("a state task failed", e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_CACHE: usize = 1 << 20;

    #[tokio::test]
    async fn done_marks_survive_reopening_and_fences_rise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let first_fence = {
            let store = EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("open");
            let claims = store.claim(&ids).await.expect("claim");
            let Claim::Leased { fence, .. } = claims[0] else {
                panic!("{claims:?}")
            };
            store.finish(&[("a".into(), fence)]).await.expect("finish");
            fence
        };
        let store = EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("reopen");
        let claims = store.claim(&ids).await.expect("claim");
        assert_eq!(claims[0], Claim::Done);
        let Claim::Leased { fence, .. } = claims[1] else {
            panic!("{claims:?}")
        };
        assert!(fence > first_fence);
        // Another pipeline name does not see these marks.
        drop(store);
        let other = EmbeddedStore::open(dir.path(), "q", None, TEST_CACHE).expect("open");
        assert!(matches!(
            other.claim(&ids).await.expect("claim")[0],
            Claim::Leased { .. }
        ));
    }

    #[tokio::test]
    async fn marks_from_many_batches_at_once_are_all_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("open"));
        let batches: Vec<Vec<(String, u64)>> = (0..20)
            .map(|b| (0..50).map(|i| (format!("{b}-{i}"), 1)).collect())
            .collect();
        let writes: Vec<_> = batches
            .iter()
            .cloned()
            .map(|batch| {
                let store = store.clone();
                tokio::spawn(async move { store.finish(&batch).await })
            })
            .collect();
        for write in writes {
            write.await.expect("join").expect("finish");
        }
        drop(Arc::into_inner(store).expect("one owner"));
        // Reopened, every mark is there (the writer finished before the drop returned).
        let store = EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("reopen");
        let ids: Vec<String> = batches.concat().into_iter().map(|(id, _)| id).collect();
        let claims = store.claim(&ids).await.expect("claim");
        assert!(claims.iter().all(|c| *c == Claim::Done), "{claims:?}");
    }

    #[tokio::test]
    async fn expired_marks_do_not_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            EmbeddedStore::open(dir.path(), "p", Some(Duration::from_millis(1)), TEST_CACHE)
                .expect("open");
        store.finish(&[("a".into(), 1)]).await.expect("finish");
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(
            store.claim(&["a".into()]).await.expect("claim")[0],
            Claim::Leased { .. }
        ));
    }

    #[tokio::test]
    async fn files_are_cut_back_to_the_length_marked_with_the_last_done_marks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (out, fresh) = (dir.path().join("out.jsonl"), dir.path().join("new.jsonl"));
        std::fs::write(&out, "old\n").expect("write");
        {
            let store = EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("open");
            assert!(
                store
                    .cut_back(std::slice::from_ref(&out))
                    .expect("cut")
                    .is_empty()
            );
            std::fs::write(&out, "old\nmarked\n").expect("write");
            let files = vec![FileLength {
                path: out.clone(),
                length: 11,
            }];
            let commit = Commit {
                files,
                ..Commit::default()
            };
            store
                .finish_with(&[("a".into(), 1)], commit, Turn::free())
                .await
                .expect("finish");
            std::fs::write(&out, "old\nmarked\nnever marked done\n").expect("write");
        }
        let store = EmbeddedStore::open(dir.path(), "p", None, TEST_CACHE).expect("reopen");
        let cut = store.cut_back(&[out.clone(), fresh.clone()]).expect("cut");
        assert_eq!(cut, vec![(out.clone(), 18)]);
        assert_eq!(
            std::fs::read_to_string(&out).expect("read"),
            "old\nmarked\n"
        );
        std::fs::write(&fresh, "x\n").expect("write");
        // A file seen for the first time was recorded as it was (absent: 0 bytes).
        let cut = store.cut_back(std::slice::from_ref(&fresh)).expect("cut");
        assert_eq!(cut, vec![(fresh, 2)]);
    }
}
