//! The free records in the order they became free: a doubly linked list threaded through a vector,
//! so that a lock becoming free (push at the back), being taken again (unlink wherever it stands)
//! and being pruned (pop at the front) are each O(1), with no allocation once the vector has grown.
//!
//! An uncontended LOCK+UNLOCK pair takes a free record and frees it again, so this is on the hot path
//! of every lock: an ordered map here cost a tree insert and a tree remove per pair.

use std::sync::Arc;

use tokio::time::Instant;

/// Marks the end of a chain.
const NIL: usize = usize::MAX;

/// Slots kept when the list empties; more are given back.
const SHRINK_FLOOR: usize = 64;

/// One place in the list: a free record's key and when it became free, or a vacant slot.
struct Node {
    /// The free record's key; `None` while the slot is vacant.
    key: Option<Arc<str>>,
    /// When the record became free.
    since: Instant,
    /// The node before (older), or [`NIL`].
    prev: usize,
    /// The node after (newer), or [`NIL`]; for a vacant slot, the next vacant slot.
    next: usize,
}

/// Free records, oldest first.
pub(super) struct FreeList {
    /// Every slot, in use or vacant. Grows to the most records ever free at once, which the record
    /// limit bounds; a slot is about 40 bytes.
    nodes: Vec<Node>,
    /// The oldest free record, or [`NIL`].
    head: usize,
    /// The newest free record, or [`NIL`].
    tail: usize,
    /// The first vacant slot, or [`NIL`]; vacant slots are chained through `next`.
    vacant: usize,
    /// Records in the list.
    len: usize,
}

impl FreeList {
    pub(super) fn new() -> FreeList {
        FreeList {
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            vacant: NIL,
            len: 0,
        }
    }

    /// Records in the list.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether no record is free.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `key`, free since `since`, as the newest; returns its slot, for [`FreeList::remove`].
    pub(super) fn push_back(&mut self, key: Arc<str>, since: Instant) -> usize {
        let node = Node {
            key: Some(key),
            since,
            prev: self.tail,
            next: NIL,
        };
        let slot = if self.vacant != NIL {
            let slot = self.vacant;
            self.vacant = self.nodes[slot].next;
            self.nodes[slot] = node;
            slot
        } else {
            self.nodes.push(node);
            self.nodes.len() - 1
        };
        match self.tail {
            NIL => self.head = slot,
            tail => self.nodes[tail].next = slot,
        }
        self.tail = slot;
        self.len += 1;
        slot
    }

    /// Takes the record in `slot` out of the list, wherever it stands. A slot not in use is left
    /// alone.
    pub(super) fn remove(&mut self, slot: usize) -> Option<Arc<str>> {
        let node = self.nodes.get_mut(slot)?;
        let key = node.key.take()?;
        let (prev, next) = (node.prev, node.next);
        node.next = self.vacant;
        self.vacant = slot;
        match prev {
            NIL => self.head = next,
            prev => self.nodes[prev].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.nodes[next].prev = prev,
        }
        self.len -= 1;
        if self.len == 0 && self.nodes.len() > SHRINK_FLOOR {
            // Nothing is free after many were: give the slots' memory back. (A few slots are kept
            // for ever, so a lock taken and freed in turn never allocates.)
            self.nodes = Vec::new();
            self.vacant = NIL;
        }
        Some(key)
    }

    /// The oldest free record: its key and when it became free.
    pub(super) fn front(&self) -> Option<(&Arc<str>, Instant)> {
        let node = self.nodes.get(self.head)?;
        Some((node.key.as_ref()?, node.since))
    }

    /// Takes the oldest free record out of the list.
    pub(super) fn pop_front(&mut self) -> Option<Arc<str>> {
        self.remove(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &mut FreeList) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(key) = list.pop_front() {
            out.push(key.to_string());
        }
        out
    }

    #[test]
    fn oldest_first_and_removal_anywhere() {
        let now = Instant::now();
        let mut list = FreeList::new();
        let slots: Vec<usize> = ["a", "b", "c", "d"]
            .iter()
            .map(|k| list.push_back(Arc::from(*k), now))
            .collect();
        assert_eq!(list.remove(slots[1]).as_deref(), Some("b"));
        assert_eq!(list.remove(slots[1]), None, "a slot is removed once");
        assert_eq!(list.remove(slots[3]).as_deref(), Some("d"));
        // The vacant slots are reused, and the order is the order of pushing.
        list.push_back(Arc::from("e"), now);
        list.push_back(Arc::from("f"), now);
        assert_eq!(list.len(), 4);
        assert_eq!(list.front().map(|(k, _)| k.to_string()), Some("a".into()));
        assert_eq!(keys(&mut list), ["a", "c", "e", "f"]);
        assert!(list.is_empty());
    }

    #[test]
    fn an_emptied_list_gives_its_memory_back() {
        let now = Instant::now();
        let mut list = FreeList::new();
        for i in 0..10_000 {
            list.push_back(Arc::from(format!("k{i}")), now);
        }
        assert_eq!(keys(&mut list).len(), 10_000);
        assert_eq!(list.nodes.capacity(), 0, "an emptied list holds no memory");
    }

    #[test]
    fn the_vector_grows_to_the_most_free_at_once() {
        let now = Instant::now();
        let mut list = FreeList::new();
        list.push_back(Arc::from("keep"), now);
        for i in 0..10_000 {
            let slot = list.push_back(Arc::from(format!("k{i}")), now);
            list.remove(slot);
        }
        assert_eq!(list.nodes.len(), 2, "taken-again records reuse their slot");
    }
}
