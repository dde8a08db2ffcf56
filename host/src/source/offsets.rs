//! Which offsets of a topic's partitions may be committed: only the contiguous prefix of
//! records whose fate is durable. A record handed out but not finished (in flight, or whose
//! lease another worker took) holds its partition's commit point back, however many records
//! after it are finished.
//!
//! Partitions come and go with rebalances; each assignment gets a new epoch, so a record
//! handed out under an earlier assignment can never move the commit point of a later one.

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
}

impl PartitionOffsets {
    /// The offset to commit: the first unfinished one, or one past everything finished.
    fn commit_point(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next_after_finished)
    }
}

/// Commit points per partition of one topic.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: BTreeMap<i32, PartitionOffsets>,
    next_epoch: u64,
}

impl OffsetTracker {
    /// The partition is ours (again), from a fresh start.
    pub fn assign(&mut self, partition: i32) {
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            PartitionOffsets {
                epoch: self.next_epoch,
                in_flight: BTreeSet::new(),
                next_after_finished: None,
                reported: None,
            },
        );
    }

    /// The partition is no longer ours; returns its commit point (for a graceful revoke).
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        self.partitions.remove(&partition)?.commit_point()
    }

    /// Every partition is gone (lost, or the consumer closed); nothing is returned, since a
    /// lost partition must not be committed.
    pub fn clear(&mut self) {
        self.partitions.clear();
    }

    /// The assigned partitions.
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// A record was handed out; returns the epoch to finish it with, or `None` when the
    /// partition is not assigned (the record must be dropped, not processed).
    pub fn hand_out(&mut self, partition: i32, offset: i64) -> Option<u64> {
        let p = self.partitions.get_mut(&partition)?;
        p.in_flight.insert(offset);
        Some(p.epoch)
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

    #[test]
    fn commit_point_is_the_contiguous_finished_prefix() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        let e = t.hand_out(0, 10).expect("assigned");
        for o in 11..15 {
            t.hand_out(0, o);
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
        t.assign(3);
        let e = t.hand_out(3, 5).expect("assigned");
        t.hand_out(3, 9); // 6..8 were compacted away or are transaction markers
        t.finish(3, 5, e);
        t.finish(3, 9, e);
        assert_eq!(t.commit_points(), vec![(3, 10)]);
    }

    #[test]
    fn records_of_an_earlier_assignment_never_move_a_later_one() {
        let mut t = OffsetTracker::default();
        t.assign(1);
        let old = t.hand_out(1, 100).expect("assigned");
        assert_eq!(t.revoke(1), Some(100));
        assert!(t.hand_out(1, 101).is_none(), "unassigned: dropped");
        t.assign(1);
        assert!(!t.is_current(1, old));
        let new = t.hand_out(1, 50).expect("assigned");
        t.finish(1, 100, old);
        assert_eq!(t.commit_points(), vec![(1, 50)]);
        t.finish(1, 50, new);
        assert_eq!(t.commit_points(), vec![(1, 51)]);
    }

    #[test]
    fn a_lost_partition_reports_nothing() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        let e = t.hand_out(0, 1).expect("assigned");
        t.finish(0, 1, e);
        t.clear();
        assert!(t.commit_points().is_empty());
        assert!(t.take_commit_points().is_empty());
    }
}
