//! Validated names: channels and event names.
//!
//! A `ChannelName` carries its 64-bit FNV-1a hash so cursors can name a channel in eight
//! bytes, and the hash is stable across processes and builds (several nodes must agree on
//! it). 32 bits were not enough: real names collide (`gwzx` and `16cd`), and two colliding
//! channels in one subscription would share a cursor entry.
//!
//! Issue 17: every publish and every poll names its channel, and each made a new `Arc<str>`
//! for a name the node already holds. `ChannelName::new` hands out a clone of the name made
//! last in its slot (`NAMES`), so a busy channel's requests allocate no name.
//!
//! Concurrency: `NAMES` is one small cache per thread (`thread_local!`), touched only inside
//! `ChannelName::new`, with no lock and no await. Bounded: `NAME_SLOTS` names per thread
//! (each at most `MAX_CHANNEL_LEN` bytes), a slot chosen by the name's hash and replaced by
//! the next name that falls in it. Names compare by their text, so a shared one is the same
//! name in every way.

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

pub const MAX_CHANNEL_LEN: usize = 128;
pub const MAX_EVENT_LEN: usize = 64;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid channel name {0:?}: use 1 to 128 of A-Z a-z 0-9 _ . : @ = -")]
    Channel(String),
    #[error("invalid event name {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . -")]
    Event(String),
}

/// A channel name matching `^[A-Za-z0-9_.:@=-]{1,128}$`.
/// Names kept per thread by `ChannelName::new`.
const NAME_SLOTS: usize = 64;

thread_local! {
    static NAMES: std::cell::RefCell<[Option<ChannelName>; NAME_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; NAME_SLOTS]) };
}

#[derive(Clone)]
pub struct ChannelName {
    name: Arc<str>,
    hash: u64,
}

impl ChannelName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_CHANNEL_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b));
        if !valid {
            return Err(NameError::Channel(truncate_for_error(name)));
        }
        let hash = fnv1a64(name.as_bytes());
        Ok(NAMES.with(|names| {
            let mut names = names.borrow_mut();
            let slot = &mut names[(hash % NAME_SLOTS as u64) as usize];
            match slot {
                Some(kept) if kept.hash == hash && &*kept.name == name => kept.clone(),
                _ => slot
                    .insert(Self {
                        name: Arc::from(name),
                        hash,
                    })
                    .clone(),
            }
        }))
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The part before the first `:`, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.name.split_once(':').map(|(ns, _)| ns)
    }

    /// Stable 64-bit hash used inside cursors.
    pub fn hash64(&self) -> u64 {
        self.hash
    }

    /// A name carrying a chosen hash: what a deliberate FNV-1a collision looks like, for the
    /// tests of the collision guard (`cursor::collision`) without a 2^32-step search.
    #[cfg(test)]
    pub(crate) fn with_hash(name: &str, hash: u64) -> Self {
        Self {
            name: Arc::from(name),
            hash,
        }
    }
}

impl PartialEq for ChannelName {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name
    }
}
impl Eq for ChannelName {}

impl std::hash::Hash for ChannelName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl PartialOrd for ChannelName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ChannelName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}
impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.name)
    }
}

/// An event name matching `^[A-Za-z0-9_.-]{1,64}$`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EventName(Arc<str>);

impl EventName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_EVENT_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if valid {
            Ok(Self(Arc::from(name)))
        } else {
            Err(NameError::Event(truncate_for_error(name)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keeps error messages short when the input is huge.
fn truncate_for_error(s: &str) -> String {
    s.chars().take(140).collect()
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_accept_the_spec_alphabet_and_reject_the_rest() {
        assert!(ChannelName::new("chat:lobby").is_ok());
        assert!(ChannelName::new("a_b.c:d@e=f-g").is_ok());
        assert!(ChannelName::new(&"x".repeat(128)).is_ok());
        assert!(ChannelName::new(&"x".repeat(129)).is_err());
        assert!(ChannelName::new("").is_err());
        assert!(ChannelName::new("has space").is_err());
        assert!(ChannelName::new("slash/").is_err());
        assert!(ChannelName::new("é").is_err());
    }

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        assert_eq!(
            ChannelName::new("chat:a:b").unwrap().namespace(),
            Some("chat")
        );
        assert_eq!(ChannelName::new("news").unwrap().namespace(), None);
    }

    #[test]
    fn event_names_reject_colons_and_overlong_names() {
        assert!(EventName::new("msg.new-1").is_ok());
        assert!(EventName::new("a:b").is_err());
        assert!(EventName::new(&"e".repeat(65)).is_err());
    }

    #[test]
    fn the_channel_hash_is_stable_fnv1a_64() {
        // Known FNV-1a 64 vector: "a" -> 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        // These two collide under FNV-1a 32; they must not share a cursor entry.
        let (a, b) = (
            ChannelName::new("gwzx").unwrap(),
            ChannelName::new("16cd").unwrap(),
        );
        assert_ne!(a.hash64(), b.hash64());
    }

    #[test]
    fn a_name_made_again_shares_the_text_of_the_one_made_before() {
        let a = ChannelName::new("chat:lobby").unwrap();
        let again = ChannelName::new("chat:lobby").unwrap();
        assert_eq!(a, again);
        assert_eq!(a.as_str().as_ptr(), again.as_str().as_ptr());
        // Many names through the slots: each comes back as itself, with its own hash.
        for i in 0..4 * NAME_SLOTS {
            let text = format!("c{i}");
            let name = ChannelName::new(&text).unwrap();
            assert_eq!(name.as_str(), text);
            assert_eq!(name.hash64(), fnv1a64(text.as_bytes()));
        }
        assert!(ChannelName::new("no spaces").is_err());
        assert_eq!(ChannelName::new("chat:lobby").unwrap(), a);
    }
}
