//! Which offsets of a topic's partitions may be committed: only the contiguous prefix of
//! records whose fate is durable. A record handed out but not finished (in flight, or whose
//! lease another worker took) holds its partition's commit point back, however many records
//! after it are finished.
//!
//! Partitions come and go with rebalances; each assignment gets a new epoch, so a record
//! handed out under an earlier assignment can never move the commit point of a later one.
//!
//! Within an assignment, offsets must arrive in order ([`OffsetTracker::admit`]): a record
//! seen again is dropped, and a jump forward is read again once from the expected offset
//! and believed only when the same jump comes again (a compacted topic or a transaction marker leaves real gaps; a
//! consumer that skipped prefetched records must not have the prefix committed past them —
//! we once saw exactly that during rebalances, on another Kafka-protocol broker).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug)]
struct PartitionOffsets {
    epoch: u64,
    /// Handed out, not finished.
    in_flight: BTreeSet<i64>,
    /// One past the highest finished offset.
    next_after_finished: Option<i64>,
    /// The last commit point reported by [`OffsetTracker::take_commit_points`].
    reported: Option<i64>,
    /// One past the highest offset handed out.
    next_expected: Option<i64>,
    /// Set while a gap is being read again: the offset sought back to, the offset that
    /// came instead, and how many records were dropped meanwhile.
    reread: Option<Reread>,
}

impl PartitionOffsets {
    /// The offset to commit: the first unfinished one, or one past everything finished.
    fn commit_point(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next_after_finished)
    }
}

/// What to do with a record the consumer delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Hand it out; finish it with this epoch.
    Take(u64),
    /// Handed out already in this assignment: drop it.
    Seen,
    /// Records before it were skipped: drop it and seek the partition back to this offset.
    ReadAgainFrom(i64),
}

/// A gap being read again.
#[derive(Debug, Clone, Copy)]
struct Reread {
    from: i64,
    came: i64,
    dropped: u32,
}

/// Records dropped while waiting for a seek back to land, before seeking again.
const REREAD_PATIENCE: u32 = 10_000;

/// Commit points per partition of one topic.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: BTreeMap<i32, PartitionOffsets>,
    next_epoch: u64,
}

impl OffsetTracker {
    /// The partition is ours (again), from a fresh start.
    /// `start` is where the group's consumption resumes (the committed offset, or the
    /// earliest one), when known: the first record must be that one.
    pub fn assign(&mut self, partition: i32, start: Option<i64>) {
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            PartitionOffsets {
                epoch: self.next_epoch,
                in_flight: BTreeSet::new(),
                next_after_finished: None,
                reported: None,
                next_expected: start,
                reread: None,
            },
        );
    }

    /// The partition is no longer ours; returns its commit point (for a graceful revoke).
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        self.partitions.remove(&partition)?.commit_point()
    }

    /// The assigned partitions.
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// Whether the record at `offset` is the next of its partition, and so may be handed
    /// out (see the module docs).
    pub fn admit(&mut self, partition: i32, offset: i64) -> Admission {
        let Some(p) = self.partitions.get_mut(&partition) else {
            // Not announced by a callback we saw: taken as assigned from here, since
            // dropping its records would lose them.
            self.assign(partition, None);
            return self.admit(partition, offset);
        };
        if let Some(expected) = p.next_expected {
            if offset < expected {
                return Admission::Seen;
            }
            if offset > expected {
                match &mut p.reread {
                    // The same jump after reading again: the gap is real.
                    Some(r) if r.from == expected && r.came == offset => {}
                    // Records still queued from before the seek: drop until it lands.
                    Some(r) if r.from == expected && r.dropped < REREAD_PATIENCE => {
                        r.dropped += 1;
                        return Admission::Seen;
                    }
                    _ => {
                        p.reread = Some(Reread {
                            from: expected,
                            came: offset,
                            dropped: 0,
                        });
                        return Admission::ReadAgainFrom(expected);
                    }
                }
            }
        }
        p.reread = None;
        let admit = p.epoch;
        p.in_flight.insert(offset);
        p.next_expected = Some(offset + 1);
        Admission::Take(admit)
    }

    /// Whether a record handed out under `epoch` still belongs to the current assignment.
    pub fn is_current(&self, partition: i32, epoch: u64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.epoch == epoch)
    }

    /// The record's fate is durable.
    pub fn finish(&mut self, partition: i32, offset: i64, epoch: u64) {
        if let Some(p) = self.partitions.get_mut(&partition)
            && p.epoch == epoch
            && p.in_flight.remove(&offset)
        {
            p.next_after_finished = Some(
                p.next_after_finished
                    .map_or(offset + 1, |n| n.max(offset + 1)),
            );
        }
    }

    /// Commit points that moved since the last call.
    pub fn take_commit_points(&mut self) -> Vec<(i32, i64)> {
        let mut moved = Vec::new();
        for (&partition, p) in &mut self.partitions {
            if let Some(point) = p.commit_point()
                && p.reported != Some(point)
            {
                p.reported = Some(point);
                moved.push((partition, point));
            }
        }
        moved
    }

    /// Commit points of every assigned partition (for a final commit).
    pub fn commit_points(&self) -> Vec<(i32, i64)> {
        self.partitions
            .iter()
            .filter_map(|(&partition, p)| Some((partition, p.commit_point()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(t: &mut OffsetTracker, partition: i32, offset: i64) -> u64 {
        match t.admit(partition, offset) {
            Admission::Take(epoch) => epoch,
            other => panic!("{partition}:{offset} not taken: {other:?}"),
        }
    }

    #[test]
    fn commit_point_is_the_contiguous_finished_prefix() {
        let mut t = OffsetTracker::default();
        t.assign(0, None);
        let e = take(&mut t, 0, 10);
        for o in 11..15 {
            take(&mut t, 0, o);
        }
        for o in [11, 12, 14] {
            t.finish(0, o, e);
        }
        // 10 is still in flight: nothing may be committed past it.
        assert_eq!(t.take_commit_points(), vec![(0, 10)]);
        t.finish(0, 10, e);
        assert_eq!(t.take_commit_points(), vec![(0, 13)]);
        t.finish(0, 13, e);
        assert_eq!(t.take_commit_points(), vec![(0, 15)]);
        assert_eq!(
            t.take_commit_points(),
            vec![],
            "unchanged points are not repeated"
        );
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_the_prefix_back() {
        let mut t = OffsetTracker::default();
        t.assign(3, None);
        let e = take(&mut t, 3, 5);
        // 6..8 were compacted away or are transaction markers: read again once, then believed
        // when the same jump comes again.
        assert_eq!(t.admit(3, 9), Admission::ReadAgainFrom(6));
        assert_eq!(t.admit(3, 10), Admission::Seen);
        take(&mut t, 3, 9);
        t.finish(3, 5, e);
        t.finish(3, 9, e);
        assert_eq!(t.commit_points(), vec![(3, 10)]);
    }

    #[test]
    fn records_of_an_earlier_assignment_never_move_a_later_one() {
        let mut t = OffsetTracker::default();
        t.assign(1, None);
        let old = take(&mut t, 1, 100);
        assert_eq!(t.revoke(1), Some(100));
        t.assign(1, None);
        assert!(!t.is_current(1, old));
        let new = take(&mut t, 1, 50);
        t.finish(1, 100, old);
        assert_eq!(t.commit_points(), vec![(1, 50)]);
        t.finish(1, 50, new);
        assert_eq!(t.commit_points(), vec![(1, 51)]);
    }

    #[test]
    fn skipped_records_are_read_again_and_repeats_dropped() {
        let mut t = OffsetTracker::default();
        t.assign(5, None);
        let e = take(&mut t, 5, 447);
        assert_eq!(
            t.admit(5, 472),
            Admission::ReadAgainFrom(448),
            "448..471 skipped"
        );
        take(&mut t, 5, 448);
        assert_eq!(t.admit(5, 448), Admission::Seen);
        t.finish(5, 447, e);
        assert_eq!(
            t.commit_points(),
            vec![(5, 448)],
            "never past the skipped records"
        );
    }

    #[test]
    fn the_first_record_of_an_assignment_must_be_where_the_group_resumes() {
        let mut t = OffsetTracker::default();
        t.assign(2, Some(40));
        assert_eq!(t.admit(2, 55), Admission::ReadAgainFrom(40));
        take(&mut t, 2, 40);
    }

    #[test]
    fn a_partition_nobody_announced_is_tracked_not_dropped() {
        let mut t = OffsetTracker::default();
        let e = take(&mut t, 7, 3);
        assert!(t.is_current(7, e));
        t.finish(7, 3, e);
        assert_eq!(t.commit_points(), vec![(7, 4)]);
    }
}
