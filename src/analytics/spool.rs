//! Batches waiting for ClickHouse, one file each in the data dir, so that an outage (or a
//! restart during one) loses nothing up to a size cap. A file is named
//! `{batch id}.{table}.{day}.{rows}.jsonl` and holds exactly the body of its insert; ids sort
//! by creation time, so the directory's order is the order to send in. A file is written
//! under a temporary name and renamed, so a crash never leaves half a batch behind. Past
//! the cap the oldest batches are deleted and their rows counted as dropped.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::Table;

/// Rows for one table, ready to insert: the unit of sending, spooling and deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Batch {
    pub(super) id: String,
    pub(super) table: Table,
    /// The UTC day (days since the epoch) of every row: the partition it lands in.
    pub(super) day: u32,
    pub(super) rows: usize,
    pub(super) lines: Vec<u8>,
}

/// A new batch id: 32 hex digits that sort by creation time (milliseconds, then a
/// per-process counter), then random bits so two processes never collide.
pub(super) fn batch_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff;
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    format!("{:012x}{count:04x}{random:016x}", ms & 0xffff_ffff_ffff)
}

/// A batch in the spool, without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spooled {
    pub(super) id: String,
    pub(super) table: Table,
    pub(super) day: u32,
    pub(super) rows: usize,
    bytes: u64,
    path: PathBuf,
}

/// The spool directory and what it holds, oldest first.
pub(super) struct Spool {
    dir: PathBuf,
    cap: u64,
    files: BTreeMap<String, Spooled>,
    bytes: u64,
}

impl Spool {
    /// Opens (creating) the directory and takes stock of what an earlier process left.
    pub(super) fn open(dir: &Path, cap: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut spool = Self { dir: dir.to_path_buf(), cap, files: BTreeMap::new(), bytes: 0 };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write the process did not finish: never a batch.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(spooled) = parse_name(&name, &path, entry.metadata()?.len()) else { continue };
            spool.bytes += spooled.bytes;
            spool.files.insert(spooled.id.clone(), spooled);
        }
        Ok(spool)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.files.len()
    }

    /// Writes `batch` to the spool, then deletes the oldest batches while the spool is
    /// over its cap; returns the rows so dropped. A batch larger than the cap by itself
    /// is dropped whole.
    pub(super) fn push(&mut self, batch: &Batch) -> io::Result<usize> {
        let name = format!("{}.{}.{}.{}.jsonl", batch.id, batch.table.name(), batch.day, batch.rows);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, &batch.lines)?;
        std::fs::rename(&tmp, &path)?;
        let bytes = batch.lines.len() as u64;
        self.bytes += bytes;
        let spooled =
            Spooled { id: batch.id.clone(), table: batch.table, day: batch.day, rows: batch.rows, bytes, path };
        self.files.insert(batch.id.clone(), spooled);
        let mut dropped = 0;
        while self.bytes > self.cap {
            let Some((_, oldest)) = self.files.pop_first() else { break };
            self.bytes -= oldest.bytes;
            dropped += oldest.rows;
            std::fs::remove_file(&oldest.path)?;
        }
        Ok(dropped)
    }

    /// The oldest batches, up to `max`.
    pub(super) fn oldest(&self, max: usize) -> Vec<Spooled> {
        self.files.values().take(max).cloned().collect()
    }

    pub(super) fn read(&self, spooled: &Spooled) -> io::Result<Vec<u8>> {
        std::fs::read(&spooled.path)
    }

    /// Forgets a batch that was sent (or found already present).
    pub(super) fn remove(&mut self, id: &str) -> io::Result<()> {
        if let Some(spooled) = self.files.remove(id) {
            self.bytes -= spooled.bytes;
            match std::fs::remove_file(&spooled.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn parse_name(name: &str, path: &Path, bytes: u64) -> Option<Spooled> {
    let stem = name.strip_suffix(".jsonl")?;
    let mut parts = stem.split('.');
    let (id, table, day, rows) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(Spooled {
        id: id.to_string(),
        table: Table::from_name(table)?,
        day: day.parse().ok()?,
        rows: rows.parse().ok()?,
        bytes,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(table: Table, rows: usize, bytes: usize) -> Batch {
        Batch { id: batch_id(), table, day: 20_000, rows, lines: vec![b'x'; bytes] }
    }

    #[test]
    fn ids_sort_by_creation() {
        let ids: Vec<String> = (0..1000).map(|_| batch_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids.iter().all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())));
    }

    #[test]
    fn batches_come_back_in_order_also_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), 1 << 20).expect("open");
        let written: Vec<Batch> = (0..5).map(|i| batch(Table::ALL[i % 3], i + 1, 10)).collect();
        for b in &written {
            assert_eq!(spool.push(b).expect("push"), 0);
        }
        std::fs::write(dir.path().join("leftover.jsonl.tmp"), b"half").expect("write");
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).expect("reopen");
        assert!(!dir.path().join("leftover.jsonl.tmp").exists(), "an unfinished write is removed");
        assert_eq!(spool.bytes(), 50);
        let oldest = spool.oldest(10);
        let ids: Vec<&str> = oldest.iter().map(|s| s.id.as_str()).collect();
        let expected: Vec<&str> = written.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, expected);
        assert_eq!(oldest[1].table, written[1].table);
        assert_eq!(oldest[1].rows, 2);
        assert_eq!(spool.read(&oldest[0]).expect("read"), written[0].lines);
        spool.remove(&oldest[0].id).expect("remove");
        assert_eq!(spool.len(), 4);
        assert_eq!(spool.bytes(), 40);
    }

    #[test]
    fn past_the_cap_the_oldest_go_and_their_rows_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), 100).expect("open");
        let first = batch(Table::Runs, 3, 40);
        let second = batch(Table::Runs, 4, 40);
        assert_eq!(spool.push(&first).expect("push"), 0);
        assert_eq!(spool.push(&second).expect("push"), 0);
        assert_eq!(spool.push(&batch(Table::Errors, 5, 40)).expect("push"), 3, "the oldest batch's rows");
        assert_eq!(spool.oldest(1)[0].id, second.id);
        assert_eq!(spool.bytes(), 80);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
        assert_eq!(spool.push(&batch(Table::Errors, 7, 500)).expect("push"), 4 + 5 + 7, "too big: all of it goes");
        assert!(spool.is_empty());
    }
}
