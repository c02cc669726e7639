//! The plan of one batch of writes, the same on both backends: which `seq` numbers each
//! job gets from the `last_seq` its thread reached ([`Batch::firsts`]), and which of its
//! events are chat messages and how they link to their thread's messages before them
//! (migration 0011). The backends' writers ([`super::sqlite`], [`super::postgres`])
//! turn it into their statements.

use foldhash::{HashMap, HashMapExt};

use super::{Result, Row, StoreError, WriteJob};

impl WriteJob {
    /// The id of the message that the job's event at `index` carries, if it carries one.
    fn message_at(&self, index: usize) -> Option<&str> {
        self.rows.iter().find_map(|row| match row {
            Row::Message { id, event_index, .. } if *event_index == index => Some(id.as_str()),
            _ => None,
        })
    }
}

/// One [`Store::write_batch`](super::Store::write_batch): the events per thread, which
/// give each job its first `seq` ([`Batch::firsts`]) from the `last_seq` each thread
/// reached, on both backends.
pub(super) struct Batch<'a> {
    pub(super) jobs: &'a [WriteJob],
    /// Events per thread of the batch, in order of first appearance.
    pub(super) totals: Vec<(&'a str, i64)>,
    /// Each thread's place in `totals` (and `messages`): a batch of a busy node holds
    /// hundreds of jobs over tens of threads, too many to search for each job.
    pub(super) thread_index: HashMap<&'a str, usize>,
    /// The messages of each thread of the batch (events that carry one), in the same order.
    pub(super) messages: Vec<Said>,
    /// Each job's place among its thread's events in the batch: that of its first event
    /// (or of the next one, for a job without events), from 1.
    pub(super) places: Vec<i64>,
    /// For each event of the batch, in order (job by job): the id of the message it
    /// carries, if it is one.
    pub(super) message_ids: Vec<Option<&'a str>>,
    /// For each event of the batch, in the same order: for a message, the place of
    /// its thread's message before it in the batch, or 0 when that one was written before
    /// the batch (the thread row's `last_message`, as the write finds it); `None` for an
    /// event that is not a message.
    pub(super) previous: Vec<Option<i64>>,
    /// For each thread, in the order of `totals`: the `last_seq` it must have before the
    /// batch for its jobs' expectations ([`WriteJob::expected_last_seq`]) to hold, if any
    /// of them has one; -1, which no thread has, when they disagree.
    pub(super) expected: Vec<Option<i64>>,
}

/// A thread's messages in one batch.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Said {
    pub(super) count: i64,
    /// The place of the last one among the thread's events in the batch.
    pub(super) last: Option<i64>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(jobs: &'a [WriteJob]) -> Self {
        let mut totals: Vec<(&str, i64)> = Vec::new();
        let mut thread_index: HashMap<&str, usize> = HashMap::new();
        let mut messages: Vec<Said> = Vec::new();
        let mut places = Vec::with_capacity(jobs.len());
        let mut message_ids = Vec::new();
        let mut previous = Vec::new();
        let mut expected: Vec<Option<i64>> = Vec::new();
        for job in jobs {
            // The thread's events in the jobs before this one are its total so far.
            let seen = thread_index.get(job.thread_id.as_str()).copied();
            let first = seen.map_or(0, |i| totals[i].1) + 1;
            places.push(first);
            if job.events.is_empty() {
                continue;
            }
            let i = *thread_index.entry(&job.thread_id).or_insert_with(|| {
                totals.push((&job.thread_id, 0));
                messages.push(Said::default());
                expected.push(None);
                totals.len() - 1
            });
            if let Some(last) = job.expected_last_seq {
                let before = i64::try_from(last).unwrap_or(i64::MAX) - (first - 1);
                expected[i] = match expected[i] {
                    Some(other) if other != before => Some(-1),
                    _ => Some(before),
                };
            }
            totals[i].1 += job.events.len() as i64;
            let said = &mut messages[i];
            for (index, place) in (first..).take(job.events.len()).enumerate() {
                let id = job.message_at(index);
                message_ids.push(id);
                if id.is_some() {
                    previous.push(Some(said.last.unwrap_or(0)));
                    said.count += 1;
                    said.last = Some(place);
                } else {
                    previous.push(None);
                }
            }
        }
        Self { jobs, totals, thread_index, messages, places, message_ids, previous, expected }
    }

    /// The events and messages of `thread` in the batch (none for a thread the batch only
    /// creates or locks).
    pub(super) fn counts(&self, thread: &str) -> (i64, Said) {
        self.thread_index.get(thread).map_or((0, Said::default()), |&i| (self.totals[i].1, self.messages[i]))
    }

    /// The expectation of `thread`'s jobs in the batch, as [`Batch::expected`] keeps it.
    pub(super) fn expected_of(&self, thread: &str) -> Option<i64> {
        self.thread_index.get(thread).and_then(|&i| self.expected[i])
    }

    /// The first `seq` of each job, from the `(id, last_seq)` each thread reached in the
    /// writing transaction. A thread that is missing or deleted fails the batch
    /// (`NotFound`), and so does a job that expected its thread elsewhere (`Raced`).
    pub(super) fn firsts<'s>(&self, handed_out: impl IntoIterator<Item = (&'s str, i64)>) -> Result<Vec<i64>> {
        // The seq each thread had before the batch, in the order of `totals`.
        let mut before: Vec<Option<i64>> = vec![None; self.totals.len()];
        for (id, last) in handed_out {
            if let Some(&i) = self.thread_index.get(id) {
                before[i] = Some(last - self.totals[i].1);
            }
        }
        if before.contains(&None) {
            return Err(StoreError::NotFound);
        }
        let raced = self.raced(|i| before[i]);
        if !raced.is_empty() {
            return Err(StoreError::Raced(raced));
        }
        Ok(self
            .jobs
            .iter()
            .zip(&self.places)
            .map(|(job, place)| {
                let seq = self.thread_index.get(job.thread_id.as_str()).and_then(|&i| before[i]);
                seq.map_or(0, |seq| seq + place)
            })
            .collect())
    }

    /// The places of the jobs whose expectation does not hold when their threads had
    /// `before(i)` (the `last_seq` of the thread at `totals[i]` before the batch; `None`
    /// for a thread that is missing or deleted, which is not a race but `NotFound`).
    pub(super) fn raced(&self, before: impl Fn(usize) -> Option<i64>) -> Vec<usize> {
        self.jobs
            .iter()
            .zip(&self.places)
            .enumerate()
            .filter_map(|(j, (job, place))| {
                let expected = i64::try_from(job.expected_last_seq?).unwrap_or(i64::MAX);
                let i = *self.thread_index.get(job.thread_id.as_str())?;
                before(i).is_some_and(|seq| seq + place - 1 != expected).then_some(j)
            })
            .collect()
    }
}
