//! Partition keys: the value of a query's `key_by` field, which decides the shard and names the
//! state a script sees as `this`.
//!
//! A key is a string, an integer or a boolean, or [`Key::None`] for a query without `key_by`
//! (all events share one state). Short strings (up to 24 bytes, which covers tickers, device ids
//! and hashtags) are stored inline, so making a key for a lookup does not allocate.

use std::fmt;

use compact_str::CompactString;
use rhai::Dynamic;

use crate::event::Value;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// The query has no `key_by`: one state for every event.
    None,
    Bool(bool),
    Int(i64),
    Str(CompactString),
}

impl Key {
    /// The key for a `key_by` value read from an event, or the reason it cannot be one.
    pub fn from_value(value: Value<'_>) -> Result<Key, String> {
        match value {
            Value::Str(s) => Ok(Key::Str(CompactString::from(s))),
            Value::Int(n) => Ok(Key::Int(n)),
            Value::Bool(b) => Ok(Key::Bool(b)),
            other => Err(format!(
                "must be a string, an integer or a boolean, found {}",
                other.kind()
            )),
        }
    }

    /// The key for a value a script gives `emit_to`, or the reason it cannot be one: the same
    /// kinds as [`Key::from_value`] (a string, an integer or a boolean), with the same wording.
    pub fn from_dynamic(value: &Dynamic) -> Result<Key, String> {
        if let Ok(s) = value.as_immutable_string_ref() {
            return Ok(Key::Str(CompactString::from(s.as_str())));
        }
        if let Ok(n) = value.as_int() {
            return Ok(Key::Int(n));
        }
        if let Ok(b) = value.as_bool() {
            return Ok(Key::Bool(b));
        }
        let kind = if value.is_unit() {
            "()"
        } else if value.is_float() {
            "a float"
        } else if value.is_char() {
            "a character"
        } else if value.is_map() {
            "a map"
        } else if value.is_array() {
            "an array"
        } else {
            value.type_name()
        };
        Err(format!(
            "must be a string, an integer or a boolean, found {kind}"
        ))
    }

    /// The key as a Rhai value (`()` for [`Key::None`]).
    pub fn to_dynamic(&self) -> Dynamic {
        match self {
            Key::None => Dynamic::UNIT,
            Key::Bool(b) => Dynamic::from_bool(*b),
            Key::Int(n) => Dynamic::from_int(*n),
            Key::Str(s) => Dynamic::from(s.as_str().to_owned()),
        }
    }

    /// Writes the key as JSON (`null` for [`Key::None`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Key::None => out.extend_from_slice(b"null"),
            Key::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Key::Int(n) => crate::json::write_int(out, *n),
            Key::Str(s) => crate::json::write_str(out, s),
        }
    }

    /// `self == other`, with strings compared inline ([`crate::event::same_name`]): a key is
    /// compared on every event (its state's lookup, the call's context), and `==` on strings is
    /// a call of `memcmp`.
    #[inline]
    pub fn same(&self, other: &Key) -> bool {
        match (self, other) {
            (Key::Str(a), Key::Str(b)) => same_str(a, b),
            _ => self == other,
        }
    }

    /// A stable 64-bit hash, the same in every process, for assigning keys to shards.
    ///
    /// It is what `#[derive(Hash)]` on this enum gave, kept as it was: shards, cluster
    /// partitions and data directories written by earlier versions depend on it. (Maps of keys
    /// hash with the shorter [`Hash`] of `Key` below.)
    pub fn stable_hash(&self) -> u64 {
        use std::hash::BuildHasher;
        /// The derived hash's input: the variant's index, then its value.
        #[derive(Hash)]
        enum Stable<'a> {
            None,
            Bool(bool),
            Int(i64),
            Str(&'a str),
        }
        let stable = match self {
            Key::None => Stable::None,
            Key::Bool(b) => Stable::Bool(*b),
            Key::Int(n) => Stable::Int(*n),
            Key::Str(s) => Stable::Str(s.as_str()),
        };
        foldhash::fast::FixedState::with_seed(0x00ed_d1e5).hash_one(stable)
    }

    /// The shard that owns this key among `shards`: contiguous ranges of the hash space, so
    /// every shard gets an equal share.
    pub fn shard(&self, shards: usize) -> usize {
        // One shard (`eddy run`, a one-core server): no hash to compute.
        if shards <= 1 {
            return 0;
        }
        ((u128::from(self.stable_hash()) * shards as u128) >> 64) as usize
    }
}

/// Whether two key strings are equal: first by their representations, compared as three words
/// (identical representations are the same string: an inline string's bytes and length, or a
/// heap string's buffer and length), which is what a state lookup that finds its key compares;
/// then, when they differ, by their bytes.
#[inline]
fn same_str(a: &CompactString, b: &CompactString) -> bool {
    #[cfg(target_pointer_width = "64")]
    {
        const _: () = assert!(
            std::mem::size_of::<CompactString>() == 24
                && std::mem::align_of::<CompactString>() >= std::mem::align_of::<u64>()
        );
        // SAFETY: a `CompactString` is 24 bytes, aligned for `u64`, and every byte of it is
        // initialized (a pointer, a length and a capacity, or an inline buffer made from
        // zeroes); reading them as integers only compares them.
        let words = |s: &CompactString| unsafe { *(s as *const CompactString).cast::<[u64; 3]>() };
        if words(a) == words(b) {
            return true;
        }
    }
    crate::event::same_name(a, b)
}

/// Keys are hashed on every event (the lookup of their state): a string's bytes alone, an
/// integer's value, without the variant's index and the end marker `#[derive(Hash)]` writes,
/// two rounds of the hasher fewer. Equal keys hash alike; a string and an integer that collide
/// only share a bucket.
impl std::hash::Hash for Key {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Key::None => state.write_u8(0),
            Key::Bool(b) => state.write_u8(1 + u8::from(*b)),
            Key::Int(n) => state.write_i64(*n),
            Key::Str(s) => state.write(s.as_bytes()),
        }
    }
}

/// A key to look up in a map of keys: hashed as the key itself, compared with [`Key::same`].
#[derive(Hash)]
pub(crate) struct Lookup<'a>(pub &'a Key);

impl indexmap::Equivalent<Key> for Lookup<'_> {
    #[inline]
    fn equivalent(&self, key: &Key) -> bool {
        self.0.same(key)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::None => f.write_str("(none)"),
            Key::Bool(b) => write!(f, "{b}"),
            Key::Int(n) => write!(f, "{n}"),
            Key::Str(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_values() {
        assert_eq!(
            Key::from_value(Value::Str("AAPL")),
            Ok(Key::Str("AAPL".into()))
        );
        assert_eq!(Key::from_value(Value::Int(7)), Ok(Key::Int(7)));
        let err = Key::from_value(Value::Float(1.5)).unwrap_err();
        assert!(err.contains("found a float"), "{err}");
        assert!(Key::from_value(Value::Null).is_err());
    }

    #[test]
    fn keys_from_script_values() {
        assert_eq!(
            Key::from_dynamic(&Dynamic::from("rust".to_owned())),
            Ok(Key::Str("rust".into()))
        );
        assert_eq!(Key::from_dynamic(&Dynamic::from_int(-3)), Ok(Key::Int(-3)));
        assert_eq!(
            Key::from_dynamic(&Dynamic::from_bool(true)),
            Ok(Key::Bool(true))
        );
        for (value, kind) in [
            (Dynamic::from_float(1.5), "a float"),
            (Dynamic::UNIT, "()"),
            (Dynamic::from_map(rhai::Map::new()), "a map"),
            (Dynamic::from_array(rhai::Array::new()), "an array"),
        ] {
            let err = Key::from_dynamic(&value).unwrap_err();
            assert!(err.ends_with(&format!("found {kind}")), "{err}");
        }
    }

    /// `stable_hash` is still what `#[derive(Hash)]` on the enum as it was defined gave (the
    /// hash that shards, cluster partitions and data directories were assigned by), for keys
    /// of every kind and strings inline and on the heap.
    #[test]
    fn the_stable_hash_is_the_derived_hash_of_earlier_versions() {
        use std::hash::BuildHasher;
        #[derive(Hash)]
        enum Earlier {
            None,
            Bool(bool),
            Int(i64),
            Str(CompactString),
        }
        let derived = |k: &Earlier| foldhash::fast::FixedState::with_seed(0x00ed_d1e5).hash_one(k);
        let mut pairs = vec![
            (Key::None, Earlier::None),
            (Key::Bool(true), Earlier::Bool(true)),
            (Key::Bool(false), Earlier::Bool(false)),
        ];
        for n in [0, 1, -1, 7, i64::MAX, i64::MIN] {
            pairs.push((Key::Int(n), Earlier::Int(n)));
        }
        let text = "AAPL-MSFT-device-0042-#rust-and-more-than-24-bytes";
        for n in 0..text.len() {
            pairs.push((Key::Str(text[..n].into()), Earlier::Str(text[..n].into())));
        }
        for (key, earlier) in &pairs {
            assert_eq!(key.stable_hash(), derived(earlier), "{key:?}");
        }
        // As the derived hash did, it tells a string from the integer it spells.
        assert_ne!(
            Key::Str("7".into()).stable_hash(),
            Key::Int(7).stable_hash()
        );
    }

    #[test]
    fn shards_cover_the_range_evenly() {
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[Key::Str(format!("sym{i}").into()).shard(4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(Key::Int(5).shard(1), 0);
    }

    /// `same` is `==` on every pair of keys of different kinds and of strings of 0 to 30
    /// bytes (inline and on the heap) that differ anywhere or not at all; a lookup with it finds
    /// what `get` finds.
    #[test]
    fn same_is_equality() {
        let text = "abcdefghijklmnopqrstuvwxyz0123";
        let mut keys = vec![Key::None, Key::Bool(true), Key::Bool(false), Key::Int(0)];
        keys.push(Key::Int(-1));
        for n in 0..=text.len() {
            keys.push(Key::Str(text[..n].into()));
            let mut b = text.as_bytes()[..n].to_vec();
            if let Some(last) = b.last_mut() {
                *last = b'_';
            }
            keys.push(Key::Str(String::from_utf8(b).unwrap().into()));
        }
        let map: indexmap::IndexMap<Key, usize> = keys
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, k)| (k, i))
            .collect();
        for a in &keys {
            for b in &keys {
                assert_eq!(a.same(b), a == b, "{a:?} {b:?}");
            }
            assert_eq!(map.get_index_of(&Lookup(a)), map.get_index_of(a), "{a:?}");
        }
    }
}
