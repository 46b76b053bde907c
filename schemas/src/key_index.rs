//! The decoder's key lookup: the schema's JSON keys and their slots, asked ~40
//! times a record.
//!
//! Written here rather than taken from a hash-map crate because the keys are few,
//! short and fixed at start: each key is kept with its first and last 8 bytes as
//! two words, so a lookup is one multiply for the home position and, for a key
//! of at most 16 bytes (every built-in schema's), two word comparisons and a
//! length, with no call to `memcmp` (a `HashMap<String, _>` spent a tenth of
//! decoding there, in a profile). Longer keys also compare their bytes. No record
//! can choose what collides: the table holds only the schema's keys, and an
//! unknown key ends at the first empty cell.

/// Keys and their slots in an open-addressed table (linear probing, at most half
/// full).
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyIndex {
    /// Index into `keys` per cell; `EMPTY` when none.
    table: Vec<u32>,
    keys: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    key: Box<[u8]>,
    words: [u64; 2],
    slot: usize,
}

const EMPTY: u32 = u32::MAX;

/// A key's first and last 8 bytes as little-endian words (overlapping for keys of
/// 8 to 16 bytes; a shorter key in the first, zero-padded, and 0 in the second).
/// With the length, they are the whole key up to 16 bytes.
#[inline]
fn words(k: &[u8]) -> [u64; 2] {
    let n = k.len();
    if n >= 8 {
        let first = u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
        let last = u64::from_le_bytes(k[n - 8..].try_into().expect("8 bytes"));
        [first, last]
    } else {
        [k.iter().rev().fold(0u64, |w, &b| (w << 8) | u64::from(b)), 0]
    }
}

impl KeyIndex {
    fn home(&self, w: [u64; 2], len: usize) -> usize {
        let h = (w[0] ^ w[1].rotate_left(29) ^ len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 32) as usize & (self.table.len() - 1)
    }

    /// Add `key` at `slot` (a key added again takes the new slot).
    pub(crate) fn insert(&mut self, key: String, slot: usize) {
        if let Some(e) = self.keys.iter_mut().find(|e| *e.key == *key.as_bytes()) {
            e.slot = slot;
            return;
        }
        let words = words(key.as_bytes());
        self.keys.push(Entry { key: key.into_bytes().into_boxed_slice(), words, slot });
        // At most half full: rebuild at twice the keys, rounded to a power of two.
        let cells = (self.keys.len() * 2).next_power_of_two().max(8);
        self.table = vec![EMPTY; cells];
        for (i, e) in self.keys.iter().enumerate() {
            let mut c = self.home(e.words, e.key.len());
            while self.table[c] != EMPTY {
                c = (c + 1) & (cells - 1);
            }
            self.table[c] = u32::try_from(i).expect("fewer than 2^32 keys");
        }
    }

    /// The slot of `key`, if it is one of the schema's.
    #[inline]
    pub(crate) fn get(&self, key: &str) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let k = key.as_bytes();
        let w = words(k);
        let mut c = self.home(w, k.len());
        loop {
            let i = self.table[c];
            if i == EMPTY {
                return None;
            }
            let e = &self.keys[i as usize];
            if e.words == w && e.key.len() == k.len() && (k.len() <= 16 || *e.key == *k) {
                return Some(e.slot);
            }
            c = (c + 1) & (self.table.len() - 1);
        }
    }
}

impl FromIterator<(String, usize)> for KeyIndex {
    fn from_iter<I: IntoIterator<Item = (String, usize)>>(it: I) -> Self {
        let mut index = KeyIndex::default();
        it.into_iter().for_each(|(k, s)| index.insert(k, s));
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The index answers as a map of the same keys: every key its slot, any
        /// other string none (keys that share their first and last 8 bytes, or a
        /// prefix, included).
        #[test]
        fn answers_as_a_map_does(keys in prop::collection::btree_set("[a-c_]{0,20}", 0..60), probes in prop::collection::vec("[a-c_]{0,20}", 0..40)) {
            let map: std::collections::HashMap<String, usize> = keys.iter().cloned().enumerate().map(|(i, k)| (k, i * 3)).collect();
            let index: KeyIndex = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for k in keys.iter().chain(&probes) {
                prop_assert_eq!(index.get(k), map.get(k).copied(), "{:?}", k);
            }
        }
    }

    #[test]
    fn keys_alike_at_both_ends_are_told_apart() {
        let keys = ["src_bytes_total", "src_bytes_xtotal", "src_bytes", "src_bytes_tota", "a", "", "é", "ab\u{0}"];
        let index: KeyIndex = keys.iter().enumerate().map(|(i, k)| (k.to_string(), i)).collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(index.get(k), Some(i), "{k:?}");
        }
        for other in ["src_bytes_ytotal", "ab", "b", "src_bytes_totall", "\u{0}"] {
            assert_eq!(index.get(other), None, "{other:?}");
        }
        let mut again = index.clone();
        again.insert("a".into(), 99);
        assert_eq!((again.get("a"), again.get("src_bytes")), (Some(99), Some(2)));
        assert_eq!(KeyIndex::default().get("a"), None);
    }
}
