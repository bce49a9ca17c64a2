//! Dirty-set bookkeeping: merging two harvests, and the recent dirty lists
//! kept for post-run measurements.
//!
//! Invariant: dirty lists are sorted and free of duplicates (as
//! `Domain::harvest_dirty` returns them), and [`merge_sorted`] keeps them so.

use std::collections::VecDeque;

/// `out` = sorted union of two sorted, duplicate-free lists.
pub(super) fn merge_sorted(a: &[u64], b: &[u64], out: &mut Vec<u64>) {
    out.clear();
    out.reserve(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
}

/// The last `keep` checkpoints' dirty lists (none when `keep` is 0).
pub(super) struct RecentDirty {
    keep: usize,
    lists: VecDeque<Vec<u64>>,
}

impl RecentDirty {
    pub fn new(keep: usize) -> Self {
        RecentDirty {
            keep,
            lists: VecDeque::new(),
        }
    }

    /// Keeps a copy of `gfns`, dropping the oldest beyond `keep`. Call after
    /// the resume: it allocates.
    pub fn push(&mut self, gfns: &[u64]) {
        if self.keep > 0 {
            if self.lists.len() == self.keep {
                self.lists.pop_front();
            }
            self.lists.push_back(gfns.to_vec());
        }
    }

    pub fn into_lists(self) -> Vec<Vec<u64>> {
        self.lists.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_sorted_union() {
        let mut out = Vec::new();
        merge_sorted(&[1, 4, 9], &[2, 4, 10, 11], &mut out);
        assert_eq!(out, [1, 2, 4, 9, 10, 11]);
        merge_sorted(&[], &[3], &mut out);
        assert_eq!(out, [3]);
        merge_sorted(&[5], &[], &mut out);
        assert_eq!(out, [5]);
    }

    #[test]
    fn recent_keeps_the_last_lists() {
        let mut r = RecentDirty::new(2);
        r.push(&[1]);
        r.push(&[2]);
        r.push(&[3]);
        assert_eq!(r.into_lists(), vec![vec![2], vec![3]]);
        let mut none = RecentDirty::new(0);
        none.push(&[1]);
        assert!(none.into_lists().is_empty());
    }
}
