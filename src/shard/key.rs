//! The connection key every part of a shard uses, and the table that holds
//! per-connection state under it.
//!
//! A key is a slot plus the generation the slot had when the connection was
//! opened, so anything that outlives its connection (a kernel completion, a
//! queued command, an entry in a list) is recognised as stale instead of
//! reaching the connection that reused the slot.

/// Generations fit in 24 bits: the ring's `user_data` carries an op kind,
/// the generation and the slot in 64 bits.
pub const GENERATION_BITS: u32 = 24;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;
// The op kind takes the top 8 bits of `user_data`, the slot the low 32.
const _: () = assert!(GENERATION_BITS + 8 + 32 <= 64);

/// A connection of one shard: its slot and the slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    slot: u32,
    generation: u32,
}

impl ConnKey {
    /// The key for `slot` at `generation` (taken modulo 2^24).
    pub fn new(slot: u32, generation: u32) -> ConnKey {
        ConnKey {
            slot,
            generation: generation & GENERATION_MASK,
        }
    }

    /// Index of the slot.
    pub fn slot(self) -> usize {
        self.slot as usize
    }

    /// The slot's generation when this connection was opened.
    pub fn generation(self) -> u32 {
        self.generation
    }
}

enum Entry<T> {
    Vacant { generation: u32 },
    Occupied { generation: u32, value: T },
}

/// Values by [`ConnKey`], in a vector indexed by slot.
///
/// A table either allocates keys ([`ConnTable::insert`], the driver's) or
/// mirrors keys allocated elsewhere ([`ConnTable::insert_at`], the shard
/// state's), never both: only allocation keeps the free list.
pub struct ConnTable<T> {
    entries: Vec<Entry<T>>,
    /// Vacant slots, reused last-freed first so the table stays dense.
    free: Vec<u32>,
    len: usize,
    /// Keys come from another table: no free list is kept (it would only
    /// grow, by a slot per connection ever closed).
    mirror: bool,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            mirror: false,
        }
    }
}

impl<T> ConnTable<T> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` in a free slot with a new generation and returns its key.
    pub fn insert(&mut self, value: T) -> ConnKey {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.entries.push(Entry::Vacant { generation: 0 });
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        let generation = match entry {
            Entry::Vacant { generation } => (*generation + 1) & GENERATION_MASK,
            // The free list only holds vacant slots.
            Entry::Occupied { generation, .. } => (*generation + 1) & GENERATION_MASK,
        };
        *entry = Entry::Occupied { generation, value };
        self.len += 1;
        ConnKey::new(slot, generation)
    }

    /// Stores `value` under a key allocated by another table, replacing
    /// whatever that slot held.
    pub fn insert_at(&mut self, key: ConnKey, value: T) {
        self.mirror = true;
        let slot = key.slot();
        if slot >= self.entries.len() {
            self.entries
                .resize_with(slot + 1, || Entry::Vacant { generation: 0 });
        }
        let entry = &mut self.entries[slot];
        if !matches!(entry, Entry::Occupied { .. }) {
            self.len += 1;
        }
        *entry = Entry::Occupied {
            generation: key.generation,
            value,
        };
    }

    /// The value of a live key.
    pub fn get(&self, key: ConnKey) -> Option<&T> {
        match self.entries.get(key.slot())? {
            Entry::Occupied { generation, value } if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// The value of a live key, mutably.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut T> {
        match self.entries.get_mut(key.slot())? {
            Entry::Occupied { generation, value } if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// True if `key` names a live entry.
    pub fn contains(&self, key: ConnKey) -> bool {
        self.get(key).is_some()
    }

    /// Removes and returns the value of a live key; its slot becomes free.
    pub fn remove(&mut self, key: ConnKey) -> Option<T> {
        let entry = self.entries.get_mut(key.slot())?;
        if !matches!(entry, Entry::Occupied { generation, .. } if *generation == key.generation) {
            return None;
        }
        let old = std::mem::replace(
            entry,
            Entry::Vacant {
                generation: key.generation,
            },
        );
        self.len -= 1;
        if !self.mirror {
            self.free.push(key.slot);
        }
        match old {
            Entry::Occupied { value, .. } => Some(value),
            Entry::Vacant { .. } => None,
        }
    }

    /// Every live key and value, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, &T)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| match entry {
                Entry::Occupied { generation, value } => {
                    Some((ConnKey::new(slot as u32, *generation), value))
                }
                Entry::Vacant { .. } => None,
            })
    }

    /// Every live key, in slot order (collected, so the table can be mutated meanwhile).
    pub fn keys(&self) -> Vec<ConnKey> {
        self.iter().map(|(key, _)| key).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_gets_a_new_generation_and_old_keys_miss() {
        let mut table = ConnTable::default();
        let a = table.insert("a");
        assert_eq!(table.remove(a), Some("a"));
        let b = table.insert("b");
        assert_eq!(a.slot(), b.slot(), "the slot is reused");
        assert_ne!(a, b);
        assert_eq!(table.get(a), None);
        assert_eq!(table.remove(a), None);
        assert_eq!(table.get(b), Some(&"b"));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_mirror_table_holds_values_under_keys_from_another() {
        let mut owner = ConnTable::default();
        let mut mirror = ConnTable::default();
        let keys: Vec<_> = (0..3).map(|i| owner.insert(i)).collect();
        for &k in &keys {
            mirror.insert_at(k, k.slot() * 10);
        }
        assert_eq!(mirror.len(), 3);
        owner.remove(keys[1]);
        mirror.remove(keys[1]);
        assert!(mirror.free.is_empty(), "a mirror keeps no free list");
        let again = owner.insert(7);
        assert_eq!(mirror.get(again), None, "the old generation does not match");
        mirror.insert_at(again, 70);
        assert_eq!(
            mirror.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            [0, 70, 20]
        );
    }

    #[test]
    fn generations_wrap_within_their_bits() {
        let key = ConnKey::new(5, u32::MAX);
        assert_eq!(key.generation(), GENERATION_MASK);
    }
}
