//! Several nodes on one Redis, end to end: real servers on port 0 sharing a real
//! `redis-server` (or a 3-master Redis Cluster), real clients over every transport.
//! The scenarios: cross-node delivery, resume on the other node, a publish burst over both
//! nodes while subscribers join, Redis dying and coming back, sharded pub/sub on a cluster,
//! presence seen from every node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../tidings-redis/tests/support/mod.rs"]
mod redis_support;

use std::sync::Arc;

use common::{Item, Kind, Start, Sub, TestServer, eventually, subscribe};
use redis_support::{RedisCluster, RedisServer, unique_prefix};
use serde_json::{Value, json};
use tidings_server::config::NamespaceConfig;

/// Two nodes on `url` under one fresh prefix.
async fn pair(url: &str, history_size: usize) -> (TestServer, TestServer) {
    let prefix = unique_prefix("e2e");
    let node = || {
        let (url, prefix) = (url.to_owned(), prefix.clone());
        TestServer::with(move |c| {
            c.broker.url = url;
            c.broker.prefix = prefix;
            c.channels.history_size = history_size;
            c.namespaces.insert(
                "room".into(),
                NamespaceConfig {
                    presence: Some(true),
                    ..Default::default()
                },
            );
        })
    };
    (node().await, node().await)
}

async fn publish_status(server: &TestServer, channel: &str, data: Value) -> (u16, Value) {
    let res = server
        .http
        .post(format!("{}/publish/{channel}", server.url))
        .header("content-type", "application/json")
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Polls `/readyz` until it answers `status` (readiness follows Redis asynchronously).
async fn await_ready(server: &TestServer, status: u16) {
    eventually(&format!("/readyz answers {status}"), async || {
        server.get_json("/readyz").await.0 == status
    })
    .await;
}

fn offsets(got: &[(String, u64, Value)]) -> Vec<u64> {
    got.iter().map(|(_, o, _)| *o).collect()
}

async fn a_message_published_on_one_node_reaches_subscribers_on_the_other(kind: Kind) {
    let (a, b) = pair(&redis_support::shared().url(), 1000).await;
    let mut sub = subscribe(&a, kind, &["news"], Start::Now).await;
    for i in 0..20 {
        b.publish("news", json!({ "n": i })).await;
    }
    let got = sub.messages(20).await;
    for (i, (channel, offset, data)) in got.iter().enumerate() {
        assert_eq!(channel, "news");
        assert_eq!(data, &json!({ "n": i }));
        if kind.positions() {
            assert_eq!(*offset, i as u64 + 1);
        }
    }
}
every_transport!(a_message_published_on_one_node_reaches_subscribers_on_the_other);

async fn a_subscriber_resumes_on_the_other_node_with_no_loss_and_no_duplicates(kind: Kind) {
    let (a, b) = pair(&redis_support::shared().url(), 1000).await;
    let mut sub = subscribe(&a, kind, &["news"], Start::Now).await;
    for i in 1..=3 {
        a.publish("news", json!(i)).await;
    }
    assert_eq!(offsets(&sub.messages(3).await), vec![1, 2, 3]);
    let cursor = sub.cursor.clone().unwrap();
    drop(sub);
    for i in 4..=6 {
        a.publish("news", json!(i)).await;
    }
    let mut sub = subscribe(&b, kind, &["news"], Start::Since(cursor)).await;
    b.publish("news", json!(7)).await;
    assert_eq!(offsets(&sub.messages(4).await), vec![4, 5, 6, 7]);
}
// Raw WebSocket frames carry no cursor to resume with.
every_transport!(a_subscriber_resumes_on_the_other_node_with_no_loss_and_no_duplicates: SseRaw, Sse, Stream, LongPoll, ShortPoll, Ws);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_publishes_over_both_nodes_reach_every_joining_subscriber_gap_free() {
    const TOTAL: u64 = 1000;
    const PUBLISHERS: u64 = 10;
    let (a, b) = pair(&redis_support::shared().url(), 10_000).await;
    let nodes = Arc::new([a, b]);
    // Counts publishes; joiners await a count instead of polling for it.
    let (published, progress) = tokio::sync::watch::channel(0u64);
    let published = Arc::new(published);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let nodes = nodes.clone();
        let published = published.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..TOTAL / PUBLISHERS {
                nodes[(p % 2) as usize]
                    .publish("burst", json!({"p": p, "i": i}))
                    .await;
                published.send_modify(|n| *n += 1);
            }
        }));
    }
    // Subscribers join on both nodes over several transports while the burst runs, half
    // from now and half replaying everything retained.
    let kinds = [Kind::Sse, Kind::Stream, Kind::Ws, Kind::LongPoll];
    let mut subs: Vec<(String, bool, Sub)> = Vec::new();
    for (i, kind) in kinds.iter().cycle().take(8).enumerate() {
        let due = (i as u64) * TOTAL / 10;
        progress.clone().wait_for(|n| *n >= due).await.unwrap();
        let replay = i % 2 == 1;
        let start = if replay {
            Start::History(10_000)
        } else {
            Start::Now
        };
        let node = &nodes[i % 2];
        let sub = subscribe(node, *kind, &["burst"], start).await;
        subs.push((
            format!(
                "{kind:?} on node {} ({})",
                i % 2,
                if replay { "replay" } else { "live" }
            ),
            replay,
            sub,
        ));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let last = TOTAL + 1;
    nodes[0].publish("burst", json!("end")).await;
    for (name, replay, mut sub) in subs {
        let mut seen = Vec::new();
        while seen.last() != Some(&last) {
            seen.push(sub.messages(1).await[0].1);
        }
        let first = seen[0];
        if replay {
            assert_eq!(first, 1, "{name}: a replay starts at the beginning");
        }
        assert_eq!(
            seen,
            (first..=last).collect::<Vec<_>>(),
            "{name}: a gap or a duplicate"
        );
    }
}

/// The goodbye a session gets when the broker goes away, per transport.
async fn assert_told_to_come_back(kind: Kind, sub: &mut Sub) {
    match sub.next().await {
        Item::Disconnect(d) if kind == Kind::WsRaw => assert_eq!(d["close"], json!(1013)),
        Item::Disconnect(d) => {
            assert_eq!(d["reason"], "broker_unavailable", "{kind:?}: {d}");
            assert_eq!(d["reconnect"], true);
        }
        other => panic!("{kind:?}: expected a disconnect, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_sessions_are_told_to_reconnect_publishes_and_readyz_answer_503_and_clients_resume_when_it_returns()
 {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let (a, b) = pair(&redis.url(), 100).await;
    let kinds = [Kind::SseRaw, Kind::Sse, Kind::Stream, Kind::Ws, Kind::WsRaw];
    let mut subs = Vec::new();
    for kind in kinds {
        subs.push((kind, subscribe(&a, kind, &["news"], Start::Now).await));
    }
    for i in 1..=3 {
        b.publish("news", json!(i)).await;
    }
    for (_, sub) in &mut subs {
        assert_eq!(sub.messages(3).await.len(), 3);
    }
    let cursor = subs[1].1.cursor.clone().unwrap();

    redis.kill();
    for (kind, sub) in &mut subs {
        assert_told_to_come_back(*kind, sub).await;
        assert!(
            sub.ended().await,
            "{kind:?}: the stream ends after the goodbye"
        );
    }
    let (status, body) = publish_status(&a, "news", json!("lost")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("broker_unavailable"))
    );
    await_ready(&a, 503).await;
    await_ready(&b, 503).await;
    let res = a
        .http
        .get(format!("{}/stream/news", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        503,
        "no new subscriptions while Redis is away"
    );

    let _redis = RedisServer::start_on(port, &[]);
    await_ready(&a, 200).await;
    await_ready(&b, 200).await;
    // This Redis kept nothing: the old cursor resumes with a gap naming the new epoch.
    let mut sub = subscribe(&b, Kind::Sse, &["news"], Start::Since(cursor)).await;
    let (status, _) = publish_status(&a, "news", json!("after")).await;
    assert_eq!(status, 200);
    match sub.next().await {
        Item::Gap(g) => assert_eq!(
            (g["reason"].as_str(), g["next_offset"].as_u64()),
            (Some("epoch_changed"), Some(1))
        ),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(sub.messages(1).await[0].2, json!("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_returns_with_its_data_clients_resume_from_their_cursors_without_a_gap() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let (a, b) = pair(&redis.url(), 100).await;
    let mut sub = subscribe(&a, Kind::Stream, &["news"], Start::Now).await;
    for i in 1..=3 {
        b.publish("news", json!(i)).await;
    }
    assert_eq!(offsets(&sub.messages(3).await), vec![1, 2, 3]);
    let cursor = sub.cursor.clone().unwrap();
    assert!(redis.command("SAVE").starts_with("+OK"));
    redis.kill();
    assert_told_to_come_back(Kind::Stream, &mut sub).await;

    let dir = redis.dir();
    let _back = RedisServer::start_on(port, &["--dir", &dir]);
    await_ready(&a, 200).await;
    await_ready(&b, 200).await;
    let mut sub = subscribe(&b, Kind::Stream, &["news"], Start::Since(cursor)).await;
    a.publish("news", json!(4)).await;
    assert_eq!(
        offsets(&sub.messages(1).await),
        vec![4],
        "no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_three_node_redis_cluster_deliver_every_channel_through_sharded_pubsub() {
    let cluster = RedisCluster::start(3);
    let (a, b) = pair(&cluster.urls().join(","), 100).await;
    let names: Vec<String> = (0..12).map(|i| format!("room:{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut on_a = subscribe(&a, Kind::Sse, &refs, Start::Now).await;
    let mut on_b = subscribe(&b, Kind::Ws, &refs, Start::Now).await;
    // The shard channels are spread over every master.
    for node in &cluster.nodes {
        let reply = node.command("PUBSUB SHARDCHANNELS");
        assert!(
            !reply.starts_with("*0"),
            "no shard channel on port {}: {reply}",
            node.port
        );
    }
    for (i, name) in names.iter().enumerate() {
        let from = if i % 2 == 0 { &a } else { &b };
        from.publish(name, json!(name)).await;
    }
    for sub in [&mut on_a, &mut on_b] {
        let mut got: Vec<String> = sub
            .messages(12)
            .await
            .into_iter()
            .map(|(c, o, _)| {
                assert_eq!(o, 1);
                c
            })
            .collect();
        got.sort();
        let mut want = names.clone();
        want.sort();
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_client_on_one_node_is_listed_by_the_other() {
    let (a, b) = pair(&redis_support::shared().url(), 100).await;
    let sub = subscribe(&a, Kind::Stream, &["room:lobby"], Start::Now).await;
    let listed = async |n: usize| {
        let (status, body) = b.get_json("/api/channels/room:lobby/presence").await;
        assert_eq!(status, 200, "{body}");
        body["clients"].as_array().map_or(0, Vec::len) == n
    };
    eventually("node b lists the client on node a", async || {
        listed(1).await
    })
    .await;
    drop(sub);
    eventually("node b sees it leave", async || listed(0).await).await;
}

async fn publish_keyed(server: &TestServer, channel: &str, key: &str, data: Value) -> (u16, Value) {
    let res = server
        .http
        .post(format!("{}/publish/{channel}", server.url))
        .header("content-type", "application/json")
        .header("Idempotency-Key", key)
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_on_the_other_node_with_its_key_is_stored_once_and_answered_the_same() {
    let (a, b) = pair(&redis_support::shared().url(), 100).await;
    let (status, first) = publish_keyed(&a, "news", "order-7", json!("x")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = publish_keyed(&b, "news", "order-7", json!("x")).await;
    assert_eq!((status, &again), (200, &first));
    let (_, other) = publish_keyed(&b, "news", "order-8", json!("y")).await;
    assert_eq!(other["offset"], 2);
    let (_, body) = a.get_json("/api/channels/news/history").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 2, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_redis_reply_answers_503_outcome_unknown_and_keyed_retries_store_each_message_once()
{
    let redis = RedisServer::start();
    let proxy = redis_support::LossyProxy::start(redis.port, 10).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let prefix = unique_prefix("lossy");
    let server = TestServer::with(move |c| {
        c.broker.url = url;
        c.broker.prefix = prefix;
        c.channels.history_size = 1000;
    })
    .await;
    // Without a key a lost reply can only be answered "unknown"…
    let mut codes = Vec::new();
    let mut stored = Vec::new();
    for i in 0..100 {
        let (status, body) = publish_status(&server, "news", json!(format!("plain-{i}"))).await;
        match status {
            200 => stored.push(json!(format!("plain-{i}"))),
            503 => codes.push(body["error"]["code"].as_str().unwrap().to_owned()),
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        codes.iter().any(|c| c == "outcome_unknown"),
        "a lost reply is outcome_unknown: {codes:?}"
    );
    // …with one the node retries by itself, and a client's retries are just as safe.
    for i in 0..100 {
        let key = format!("m{i}");
        let mut tries = 0;
        loop {
            let (status, body) = publish_keyed(&server, "news", &key, json!(i)).await;
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "{body}");
            tries += 1;
            assert!(tries < 20, "{key} never answered");
        }
    }
    proxy
        .lossy
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let (_, body) = server
        .get_json("/api/channels/news/history?limit=1000")
        .await;
    let data: Vec<Value> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    let keyed: Vec<Value> = data.iter().filter(|d| d.is_number()).cloned().collect();
    assert_eq!(keyed, (0..100).map(|i| json!(i)).collect::<Vec<_>>());
    for d in data.iter().filter(|d| d.is_string()) {
        assert_eq!(
            data.iter().filter(|x| *x == d).count(),
            1,
            "{d} stored twice"
        );
    }
    for d in &stored {
        assert!(data.contains(d), "acknowledged {d} is in history");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_ws_closes_4010_before_any_message_of_the_epoch_after_a_gap() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message as Ws;
    let redis = redis_support::shared();
    let prefix = unique_prefix("rawgap");
    let server = {
        let (url, prefix) = (redis.url(), prefix.clone());
        TestServer::with(move |c| {
            c.broker.url = url;
            c.broker.prefix = prefix;
        })
        .await
    };
    let url = format!("{}/ws/news", server.url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut next = async || loop {
        let frame = tokio::time::timeout(common::TIMEOUT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .unwrap();
        match frame {
            Ws::Ping(_) | Ws::Pong(_) => continue,
            f => return f,
        }
    };
    eventually("the raw socket is subscribed", async || {
        server.get_json("/api/channels/news").await.1["subscribers"] == 1
    })
    .await;
    for i in 1..=3 {
        server.publish("news", json!(format!("before-{i}"))).await;
    }
    for i in 1..=3 {
        assert_eq!(next().await, Ws::text(format!("\"before-{i}\"")));
    }
    // What a volatile-* eviction policy can do: the channel's keys vanish between publishes.
    redis.command(&format!("DEL {prefix}:{{news}}:m {prefix}:{{news}}:s"));
    server.publish("news", json!("after-1")).await;
    server.publish("news", json!("after-2")).await;
    match next().await {
        Ws::Close(Some(f)) => assert_eq!(u16::from(f.code), 4010, "{f:?}"),
        other => panic!("expected the 4010 close before anything of the new epoch, got {other:?}"),
    }
}
