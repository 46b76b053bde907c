//! Where the twins live: per partition, with the dirty set that becomes changelog
//! records (`TwinStore`, `ChangelogRecord`), and what an idle sweep did (`Expiry`).

use super::*;

/// What one [`TwinOperator::expire`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Idle twins swept.
    pub expired: usize,
    /// Twins evicted by `max_twins`.
    pub evicted: usize,
    /// Idle twins left for a later sweep by `max_expiries_per_sweep`.
    pub capped: usize,
}

/// One changelog write: the twin's new state, or a tombstone (`None`) when it expired.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangelogRecord {
    pub partition: i32,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// Twins of the partitions this instance owns.
#[derive(Debug, Default)]
pub struct TwinStore {
    /// Keyed by device id; each twin boxed, so a slot of the map is 32 bytes
    /// whatever the twin's size (a map grows by doubling: unboxed, the empty half
    /// after a growth would cost a whole twin per slot).
    pub(super) partitions: HashMap<i32, HashMap<Str, Box<Twin>>>,
}

impl TwinStore {
    pub fn len(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, partition: i32, device: &str) -> Option<&Twin> {
        self.partitions.get(&partition)?.get(device).map(|t| &**t)
    }
    /// Mutable access for the operators that keep per-device state inside the twin
    /// (the LSTM's recurrent state). The caller MUST only touch a twin whose event
    /// it is processing in the same batch (it is then already marked for the changelog).
    pub fn get_mut(&mut self, partition: i32, device: &str) -> Option<&mut Twin> {
        self.partitions.get_mut(&partition)?.get_mut(device).map(|t| &mut **t)
    }
    /// Every twin, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Twin> {
        self.partitions.values().flat_map(HashMap::values).map(|t| &**t)
    }
    pub fn partitions(&self) -> BTreeSet<i32> {
        self.partitions.keys().copied().collect()
    }
    /// Forget a partition's twins (it was revoked; its changelog keeps them).
    pub fn drop_partition(&mut self, partition: i32) -> usize {
        self.partitions.remove(&partition).map_or(0, |m| m.len())
    }
    /// Make a partition known (possibly empty) after its restore.
    pub fn ensure_partition(&mut self, partition: i32) {
        self.partitions.entry(partition).or_default();
    }
    /// Install a twin read from the changelog (`None` = tombstone).
    pub fn restore(&mut self, partition: i32, key: &str, twin: Option<Twin>) {
        let map = self.partitions.entry(partition).or_default();
        match twin {
            Some(t) => {
                map.insert(key.into(), Box::new(t));
            }
            None => {
                map.remove(key);
            }
        }
    }
    /// Total approximate memory of all twins.
    pub fn mem_bytes(&self) -> usize {
        self.iter().map(Twin::mem_bytes).sum()
    }
}
