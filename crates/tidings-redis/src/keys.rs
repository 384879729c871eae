//! Redis key and pub/sub channel names.
//!
//! Every name of a channel carries the channel in a hash tag (`{name}`), so a channel's
//! keys and its shard channel live in one Redis Cluster slot: the publish script touches
//! them together and SPUBLISHes to the node its readers SSUBSCRIBE on. The prefix comes
//! first so several deployments (or test runs) share one Redis without seeing each other.
//!
//! | name                   | type   | holds                                              |
//! |------------------------|--------|----------------------------------------------------|
//! | `P:{channel}:m`        | hash   | `e` epoch, `o` last offset, `t` last time (ms)     |
//! | `P:{channel}:s`        | stream | history, entry IDs `<offset>-<time ms>`            |
//! | `P:{channel}:pz`       | zset   | present client → expiry (ms)                       |
//! | `P:{channel}:ph`       | hash   | present client → `{"client","user"}`               |
//! | `P:{channel}:i0`, `:i1`| hash   | idempotency keys of two time buckets (`publish.lua`) |
//! | `P:{channel}:c`        | pub/sub (sharded in a cluster) channel of messages, joins and leaves |

use tidings_core::ChannelName;

pub const MAX_PREFIX_LEN: usize = 64;

#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// A prefix uses the channel-name alphabet: no braces (they would move the hash tag) and
    /// no glob characters (they would widen the SCAN pattern that lists channels).
    pub fn new(prefix: &str) -> Result<Self, String> {
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b));
        if !valid {
            return Err(format!(
                "broker.prefix = {prefix:?}: use 1 to {MAX_PREFIX_LEN} of A-Z a-z 0-9 _ . : @ = -"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, channel: &ChannelName, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, channel.as_str())
    }

    pub fn meta(&self, channel: &ChannelName) -> String {
        self.key(channel, "m")
    }

    pub fn stream(&self, channel: &ChannelName) -> String {
        self.key(channel, "s")
    }

    pub fn presence_expiry(&self, channel: &ChannelName) -> String {
        self.key(channel, "pz")
    }

    pub fn presence_info(&self, channel: &ChannelName) -> String {
        self.key(channel, "ph")
    }

    /// The two idempotency-key hashes (even and odd time buckets).
    pub fn idempotency(&self, channel: &ChannelName) -> [String; 2] {
        [self.key(channel, "i0"), self.key(channel, "i1")]
    }

    pub fn pubsub(&self, channel: &ChannelName) -> String {
        self.key(channel, "c")
    }

    /// The first part of every roster key (`roster.rs`): one hash tag for them all.
    pub fn roster_base(&self) -> String {
        format!("{}:{{roster}}:", self.prefix)
    }

    /// The SCAN pattern matching every channel's meta hash.
    pub fn meta_pattern(&self) -> String {
        format!("{}:{{*}}:m", self.prefix)
    }

    fn channel_between(&self, name: &[u8], suffix: &[u8]) -> Option<ChannelName> {
        let rest = name.strip_prefix(self.prefix.as_bytes())?;
        let inner = rest.strip_prefix(b":{")?.strip_suffix(suffix)?;
        ChannelName::new(std::str::from_utf8(inner).ok()?).ok()
    }

    /// The channel a meta key belongs to.
    pub fn channel_of_meta(&self, key: &[u8]) -> Option<ChannelName> {
        self.channel_between(key, b"}:m")
    }

    /// The channel a pub/sub channel name belongs to.
    pub fn channel_of_pubsub(&self, name: &[u8]) -> Option<ChannelName> {
        self.channel_between(name, b"}:c")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_name_of_a_channel_shares_one_hash_tag_after_the_prefix() {
        let k = Keys::new("tidings").unwrap();
        let c = ChannelName::new("chat:lobby").unwrap();
        assert_eq!(k.meta(&c), "tidings:{chat:lobby}:m");
        assert_eq!(k.stream(&c), "tidings:{chat:lobby}:s");
        assert_eq!(k.pubsub(&c), "tidings:{chat:lobby}:c");
        assert_eq!(k.presence_expiry(&c), "tidings:{chat:lobby}:pz");
        assert_eq!(
            k.channel_of_pubsub(k.pubsub(&c).as_bytes()),
            Some(c.clone())
        );
        assert_eq!(k.channel_of_meta(k.meta(&c).as_bytes()), Some(c));
    }

    #[test]
    fn names_of_another_prefix_or_kind_are_not_taken_for_channels() {
        let k = Keys::new("t").unwrap();
        assert_eq!(k.channel_of_meta(b"t2:{a}:m"), None);
        assert_eq!(k.channel_of_meta(b"t:{a}:s"), None);
        assert_eq!(k.channel_of_pubsub(b"t:{bad name}:c"), None);
    }

    #[test]
    fn a_prefix_with_braces_or_glob_characters_is_refused() {
        for bad in ["", "a{b", "a}", "a*", "a?", "a[b]", "has space"] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
        assert!(Keys::new("prod:eu-1").is_ok());
    }
}
