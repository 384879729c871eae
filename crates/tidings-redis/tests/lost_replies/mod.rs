//! Publishing while replies get lost (see `support::LossyProxy`), shared by the single-server
//! and the cluster tests. Kept out of `support`, which crates without tidings-redis include.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

/// What `publish_through_lost_replies` saw.
pub struct LossReport {
    pub acknowledged: usize,
    pub unknown: usize,
    pub not_stored: usize,
    pub keyed_retries: usize,
}

/// Publishes `n` messages without a key and `n` with one (retried until answered) while
/// replies get lost, then checks history: no payload stored twice, every acknowledged
/// position holds its payload, nothing answered "not stored" was stored, and every keyed
/// message is stored exactly once at the position its answer named.
pub async fn publish_through_lost_replies(
    broker: &tidings_redis::RedisBroker,
    channel: &tidings_core::ChannelName,
    n: usize,
    stop_losing: impl FnOnce(),
) -> LossReport {
    use std::collections::HashMap;
    use tidings_core::{Broker, BrokerError, Data, IdempotencyKey, PublishOptions, Since};
    let text = |s: &str| Data::Text(bytes::Bytes::from(s.to_owned()));
    let mut acked: HashMap<u64, String> = HashMap::new();
    let mut report = LossReport {
        acknowledged: 0,
        unknown: 0,
        not_stored: 0,
        keyed_retries: 0,
    };
    let mut not_stored = Vec::new();
    for i in 0..n {
        let payload = format!("plain-{i}");
        match broker.publish(channel, None, text(&payload)).await {
            Ok(m) => {
                assert!(
                    acked.insert(m.offset, payload).is_none(),
                    "offset {} twice",
                    m.offset
                );
                report.acknowledged += 1;
            }
            Err(BrokerError::OutcomeUnknown(_)) => report.unknown += 1,
            Err(BrokerError::Unavailable(_)) => {
                report.not_stored += 1;
                not_stored.push(payload);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let mut keyed: HashMap<String, u64> = HashMap::new();
    for i in 0..n {
        let payload = format!("keyed-{i}");
        let options = PublishOptions {
            idempotency_key: Some(IdempotencyKey::new(&format!("key-{i}")).unwrap()),
            ..PublishOptions::default()
        };
        let mut tries = 0;
        let offset = loop {
            tries += 1;
            assert!(tries < 50, "{payload} never answered");
            match broker
                .publish_with(channel, None, text(&payload), &options)
                .await
            {
                Ok(p) => break p.message.offset,
                Err(_) => report.keyed_retries += 1,
            }
        };
        keyed.insert(payload, offset);
    }
    stop_losing();
    let read = broker
        .read(channel, &Since::Last(1_000_000), None)
        .await
        .unwrap();
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    for m in read.replay.messages() {
        let payload = String::from_utf8_lossy(m.data.raw()).into_owned();
        stored.entry(payload).or_default().push(m.offset);
    }
    for (payload, offsets) in &stored {
        assert_eq!(offsets.len(), 1, "{payload} stored at offsets {offsets:?}");
    }
    for (offset, payload) in &acked {
        assert_eq!(
            stored.get(payload),
            Some(&vec![*offset]),
            "acknowledged {payload}"
        );
    }
    for payload in &not_stored {
        assert!(
            !stored.contains_key(payload),
            "{payload} was answered \"not stored\""
        );
    }
    for (payload, offset) in &keyed {
        assert_eq!(stored.get(payload), Some(&vec![*offset]), "keyed {payload}");
    }
    report
}
