//! The probe schedule: which instance is checked next.
//!
//! ```text
//! insert ──▶ slab entry (index, generation) ──▶ urgent queue (first checks, newest batch first)
//!                                           └──▶ deadline heap (steady checks, earliest due first)
//! remove ──▶ generation bumped: queued ids of the old entry are skipped when they come up
//! ```
//!
//! Entries live in a slab addressed by [`Id`] (index + generation), so the heap and the queue hold
//! 24- and 8-byte ids, never the entries themselves, and removing an entry is O(1): stale ids are
//! dropped lazily when they surface (and swept when they outnumber the live entries). No task,
//! timer or future exists per entry; the caller sleeps until [`Schedule::next_due`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use tokio::time::Instant;

/// Address of one entry; stays invalid once the entry is removed (its slot may be reused under a
/// new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id {
    index: u32,
    generation: u32,
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Entries, their next due time, and the first checks that go before every due one.
pub struct Schedule<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    live: usize,
    /// (due, index, generation), earliest first.
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    urgent: VecDeque<Id>,
}

impl<T> Default for Schedule<T> {
    fn default() -> Self {
        Schedule {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            heap: BinaryHeap::new(),
            urgent: VecDeque::new(),
        }
    }
}

impl<T> Schedule<T> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Makes room for `more` entries, their first checks and their steady checks, at once: an
    /// initial list of 100,000 otherwise grows each buffer by doubling, and the copies left
    /// behind add tens of MB to the resident peak.
    pub fn reserve(&mut self, more: usize) {
        self.slots.reserve(more.saturating_sub(self.free.len()));
        self.urgent.reserve(more);
        self.heap.reserve(more);
    }

    /// Adds an entry; it is neither due nor urgent until [`Schedule::at`] or [`Schedule::urgent`].
    pub fn insert(&mut self, value: T) -> Id {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return Id {
                index,
                generation: slot.generation,
            };
        }
        let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        Id {
            index,
            generation: 0,
        }
    }

    /// Removes an entry; every id of it already queued becomes stale.
    pub fn remove(&mut self, id: Id) -> Option<T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        self.sweep();
        Some(value)
    }

    pub fn get(&self, id: Id) -> Option<&T> {
        let slot = self.slots.get(id.index as usize)?;
        (slot.generation == id.generation)
            .then_some(slot.value.as_ref())
            .flatten()
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        (slot.generation == id.generation)
            .then_some(slot.value.as_mut())
            .flatten()
    }

    /// Schedules `id`'s next steady check at `due`.
    pub fn at(&mut self, id: Id, due: Instant) {
        self.heap.push(Reverse((due, id.index, id.generation)));
    }

    /// Queues a batch of first checks ahead of every earlier batch and every due check: a batch is
    /// what one registry change added, so a single new instance does not wait behind the tens of
    /// thousands of an initial list.
    pub fn urgent(&mut self, batch: Vec<Id>) {
        for id in batch.into_iter().rev() {
            self.urgent.push_front(id);
        }
    }

    /// First checks queued (ids of entries removed since may still be among them).
    pub fn urgent_len(&self) -> usize {
        self.urgent.len()
    }

    /// The next first check to run, if any.
    pub fn pop_urgent(&mut self) -> Option<Id> {
        while let Some(id) = self.urgent.pop_front() {
            if self.get(id).is_some() {
                return Some(id);
            }
        }
        // an initial list of 100,000 leaves a large, empty queue behind
        if self.urgent.capacity() > 1024 {
            self.urgent.shrink_to(1024);
        }
        None
    }

    /// The earliest steady check due at `now` or before, with its due time.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Id, Instant)> {
        while let Some(Reverse((due, index, generation))) = self.heap.peek().copied() {
            if due > now {
                return None;
            }
            self.heap.pop();
            let id = Id { index, generation };
            if self.get(id).is_some() {
                return Some((id, due));
            }
        }
        None
    }

    /// When the earliest steady check is due (stale ids at the top are dropped on the way).
    pub fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((due, index, generation))) = self.heap.peek().copied() {
            if self.get(Id { index, generation }).is_some() {
                return Some(due);
            }
            self.heap.pop();
        }
        None
    }

    /// Drops stale ids once they outnumber the live entries, so churn cannot grow the queues.
    fn sweep(&mut self) {
        let limit = 2 * self.live + 1024;
        if self.heap.len() > limit {
            let slots = &self.slots;
            self.heap.retain(|Reverse((_, index, generation))| {
                slots[*index as usize].generation == *generation
            });
        }
        if self.urgent.len() > limit {
            let slots = &self.slots;
            self.urgent
                .retain(|id| slots[id.index as usize].generation == id.generation);
        }
    }

    /// Queued ids, stale ones included (for tests of the sweep).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.heap.len() + self.urgent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reserve_makes_room_once_and_counts_free_slots() {
        let mut s = Schedule::default();
        let ids: Vec<Id> = (0..10u32).map(|n| s.insert(n)).collect();
        for id in &ids[..4] {
            s.remove(*id);
        }
        s.reserve(1000);
        let (slots, urgent, heap) = (s.slots.capacity(), s.urgent.capacity(), s.heap.capacity());
        assert!(slots >= 1006 && urgent >= 1000 && heap >= 1000);
        let added: Vec<Id> = (0..1000u32).map(|n| s.insert(n)).collect();
        s.urgent(added);
        assert_eq!(s.slots.capacity(), slots, "no growth after reserve");
        assert_eq!(s.urgent.capacity(), urgent);
        assert_eq!(s.len(), 1006);
    }

    #[tokio::test(start_paused = true)]
    async fn due_checks_come_out_earliest_first() {
        let mut s = Schedule::default();
        let now = Instant::now();
        let ids: Vec<Id> = (0..5).map(|i| s.insert(i)).collect();
        for (i, id) in ids.iter().enumerate() {
            s.at(*id, now + Duration::from_millis(100 * (5 - i as u64)));
        }
        assert_eq!(s.next_due(), Some(now + Duration::from_millis(100)));
        assert_eq!(s.pop_due(now), None, "nothing is due yet");
        let mut order = Vec::new();
        while let Some((id, _)) = s.pop_due(now + Duration::from_secs(1)) {
            order.push(*s.get(id).unwrap());
        }
        assert_eq!(order, [4, 3, 2, 1, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn new_entries_go_before_due_ones_newest_batch_first() {
        let mut s = Schedule::default();
        let now = Instant::now();
        // an initial list: 10,000 first checks
        let initial: Vec<Id> = (0..10_000).map(|i| s.insert(i)).collect();
        s.urgent(initial);
        for _ in 0..100 {
            let id = s.pop_urgent().unwrap();
            s.at(id, now);
        }
        // one new registration while most of the initial list still waits
        let late = s.insert(-1);
        s.urgent(vec![late]);
        assert_eq!(
            s.pop_urgent(),
            Some(late),
            "a new instance waits for nobody"
        );
        let next = s.pop_urgent().unwrap();
        assert_eq!(s.get(next), Some(&100), "then the list goes on");
        // due checks only come out through pop_due, which the caller asks after pop_urgent
        assert!(s.pop_due(now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn removed_entries_are_never_returned_and_stale_ids_are_swept() {
        let mut s = Schedule::default();
        let now = Instant::now();
        let a = s.insert("a");
        let b = s.insert("b");
        s.at(a, now);
        s.at(b, now);
        s.urgent(vec![a]);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let c = s.insert("c"); // reuses a's slot under a new generation
        assert_ne!(a, c);
        assert_eq!(s.get(a), None);
        assert_eq!(s.pop_urgent(), None, "a's first check was dropped");
        assert_eq!(s.pop_due(now).map(|(id, _)| id), Some(b));
        assert_eq!(s.pop_due(now), None, "c was never scheduled");
        assert_eq!(s.len(), 2);
        // churn: many entries scheduled and removed leave a bounded queue behind
        for i in 0..10_000 {
            let id = s.insert("x");
            s.at(id, now + Duration::from_secs(i));
            s.remove(id);
        }
        assert!(
            s.queued() <= 2 * s.len() + 1024 + 1,
            "{} queued",
            s.queued()
        );
    }
}
