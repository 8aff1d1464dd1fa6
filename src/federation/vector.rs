//! The version vector: for each origin node and epoch, the highest sequence number held.
//! Small (one entry per node and epoch), so kept as a sorted list; serialized as a list of
//! `{node, epoch, seq}`.

use serde::{Deserialize, Serialize};

/// Highest sequence per (origin, epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Vector(Vec<Item>);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Item {
    pub node: String,
    pub epoch: u64,
    pub seq: u64,
}

impl Vector {
    fn find(&self, node: &str, epoch: u64) -> Result<usize, usize> {
        self.0
            .binary_search_by(|i| (i.node.as_str(), i.epoch).cmp(&(node, epoch)))
    }

    /// The highest sequence held from `node` in `epoch` (0: none).
    pub fn get(&self, node: &str, epoch: u64) -> u64 {
        self.find(node, epoch).map_or(0, |i| self.0[i].seq)
    }

    /// Sets the sequence held from `node` in `epoch` (0 removes the entry).
    pub fn set(&mut self, node: &str, epoch: u64, seq: u64) {
        match (self.find(node, epoch), seq) {
            (Ok(i), 0) => {
                self.0.remove(i);
            }
            (Ok(i), s) => self.0[i].seq = s,
            (Err(_), 0) => {}
            (Err(i), s) => self.0.insert(
                i,
                Item {
                    node: node.to_string(),
                    epoch,
                    seq: s,
                },
            ),
        }
    }

    /// Raises the entry to at least `seq`.
    pub fn raise(&mut self, node: &str, epoch: u64, seq: u64) {
        if self.get(node, epoch) < seq {
            self.set(node, epoch, seq);
        }
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &Vector) {
        for i in &other.0 {
            self.raise(&i.node, i.epoch, i.seq);
        }
    }

    /// Pointwise minimum (an origin missing on either side counts as 0).
    pub fn min(&self, other: &Vector) -> Vector {
        let mut out = Vector::default();
        for i in &self.0 {
            out.set(&i.node, i.epoch, i.seq.min(other.get(&i.node, i.epoch)));
        }
        out
    }

    /// Entries where `other` is ahead: (node, epoch, ours, theirs).
    pub fn behind(&self, other: &Vector) -> Vec<(String, u64, u64, u64)> {
        other
            .0
            .iter()
            .filter(|i| self.get(&i.node, i.epoch) < i.seq)
            .map(|i| (i.node.clone(), i.epoch, self.get(&i.node, i.epoch), i.seq))
            .collect()
    }

    /// How many events `other` holds that this vector does not.
    pub fn missing(&self, other: &Vector) -> u64 {
        other
            .0
            .iter()
            .map(|i| i.seq.saturating_sub(self.get(&i.node, i.epoch)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_merge_compare_and_serialize() {
        let mut a = Vector::default();
        a.set("b", 1, 5);
        a.set("a", 2, 3);
        a.raise("a", 2, 2);
        assert_eq!(a.get("a", 2), 3);
        let mut b = Vector::default();
        b.set("a", 2, 4);
        b.set("c", 1, 1);
        assert_eq!(
            a.behind(&b),
            vec![("a".to_string(), 2, 3, 4), ("c".to_string(), 1, 0, 1)]
        );
        assert_eq!(a.missing(&b), 2);
        let m = a.min(&b);
        assert_eq!((m.get("a", 2), m.get("b", 1), m.get("c", 1)), (3, 0, 0));
        a.merge(&b);
        assert!(a.behind(&b).is_empty());
        assert_eq!((a.get("a", 2), a.get("b", 1), a.get("c", 1)), (4, 5, 1));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Vector>(&json).unwrap(), a);
        assert!(json.starts_with("[{\"node\":\"a\""), "{json}");
    }
}
