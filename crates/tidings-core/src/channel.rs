//! Validated names: channels and event names.
//!
//! A `ChannelName` carries its FNV-1a hash so cursors can name a channel in four bytes, and
//! the hash is stable across processes and builds (several nodes must agree on it).

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
#[derive(Clone)]
pub struct ChannelName {
    name: Arc<str>,
    hash: u32,
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
        Ok(Self {
            name: Arc::from(name),
            hash: fnv1a32(name.as_bytes()),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The part before the first `:`, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.name.split_once(':').map(|(ns, _)| ns)
    }

    /// Stable 32-bit hash used inside cursors.
    pub fn hash32(&self) -> u32 {
        self.hash
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

pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
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
    fn the_channel_hash_is_stable_fnv1a() {
        // Known FNV-1a 32 vector: "a" -> 0xe40c292c.
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    }
}
