//! Auth end to end, with tokens minted independently (PyJWT, tests/clients/jwt_tool.py):
//! API keys, HS256/RS256/ES256 JWTs from the header, the `token` query parameter and the
//! cookie; `alg: none`, algorithm confusion, expiry and `nbf` refused; globs; 401 vs 403;
//! `/api` for API keys only; streams ending when their token expires; CORS and Origin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{TIMEOUT, TestServer};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tidings_server::config::{NamespaceConfig, PublishSetting, Secret, SubscribeSetting};

const API_KEY: &str = "backend-key-0123456789abcdef";
const SECRET: &str = "jwt-secret-0123456789abcdef-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    std::env::var_os("TIDINGS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// Runs tests/clients/jwt_tool.py; fails with a hint when the venv is missing.
fn jwt_tool(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/clients/jwt_tool.py"))
        .args(args)
        .output()
        .expect("python with PyJWT: run scripts/test.sh once to install the test tools");
    assert!(
        out.status.success(),
        "jwt_tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn hs256(claims: Value) -> String {
    jwt_tool(&["mint", "HS256", SECRET, &claims.to_string()])
}

async fn secured() -> TestServer {
    TestServer::with(|c| {
        c.auth.api_keys = vec![Secret(API_KEY.into())];
        c.auth.jwt_secret = Some(Secret(SECRET.into()));
        c.namespaces.insert(
            "public".into(),
            NamespaceConfig {
                subscribe: Some(SubscribeSetting::Anyone),
                ..Default::default()
            },
        );
        c.namespaces.insert(
            "feed".into(),
            NamespaceConfig {
                publish: Some(PublishSetting::Server),
                ..Default::default()
            },
        );
    })
    .await
}

async fn publish(
    server: &TestServer,
    channel: &str,
    token: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut req = server
        .http
        .post(format!("{}/publish/{channel}", server.url))
        .header("content-type", "application/json")
        .body("{\"n\":1}");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let www = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap_or(Value::Null), www)
}

#[tokio::test]
async fn publishing_needs_a_key_or_a_granting_token_with_401_and_403_told_apart() {
    let server = secured().await;
    let (status, body, www) = publish(&server, "chat:a", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    assert!(www.unwrap().starts_with("Bearer"));
    assert_eq!(publish(&server, "chat:a", Some(API_KEY)).await.0, 200);
    let alice = hs256(json!({"sub": "alice", "exp": "+600", "tidings": {"publish": ["chat:*"]}}));
    assert_eq!(
        publish(&server, "chat:a:b", Some(&alice)).await.0,
        200,
        "a glob covers colons"
    );
    let (status, body, _) = publish(&server, "news", Some(&alice)).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    assert_eq!(
        publish(&server, "feed:x", Some(&alice)).await.0,
        403,
        "server-only namespace"
    );
    assert_eq!(publish(&server, "feed:x", Some(API_KEY)).await.0, 200);
    // Malformed credentials are the client's bug: 400.
    let res = server
        .http
        .post(format!("{}/publish/chat:a", server.url))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn every_token_defect_is_the_same_401() {
    let dir = std::env::temp_dir().join(format!("tidings-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    jwt_tool(&["keys", dir.to_str().unwrap()]);
    let server = secured().await;
    let grant = json!({"tidings": {"publish": ["*"]}});
    let with = |extra: Value| {
        let mut c = grant.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let defects = [
        ("expired", hs256(with(json!({"exp": "-60"})))),
        ("not yet valid", hs256(with(json!({"nbf": "+600"})))),
        ("alg none", jwt_tool(&["none", &grant.to_string()])),
        (
            "wrong secret",
            jwt_tool(&[
                "mint",
                "HS256",
                "another-secret-0123456789abcdef",
                &grant.to_string(),
            ]),
        ),
        (
            "RS256 where HS256 is configured",
            jwt_tool(&[
                "mint",
                "RS256",
                dir.join("rsa.key").to_str().unwrap(),
                &grant.to_string(),
            ]),
        ),
        ("garbage", "not.a.jwt".to_string()),
    ];
    let mut bodies = Vec::new();
    for (what, token) in &defects {
        let (status, body, www) = publish(&server, "chat:a", Some(token)).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(www.unwrap().contains("invalid_token"), "{what}");
        bodies.push(body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one answer for every defect: {bodies:?}"
    );

    // RS256 and ES256 servers accept their own tokens and refuse algorithm confusion.
    for (kind, alg) in [("rsa", "RS256"), ("ec", "ES256")] {
        let server = TestServer::with(|c| {
            c.auth.jwt_public_key_file = Some(dir.join(format!("{kind}.pub")));
        })
        .await;
        let good = jwt_tool(&[
            "mint",
            alg,
            dir.join(format!("{kind}.key")).to_str().unwrap(),
            &grant.to_string(),
        ]);
        assert_eq!(publish(&server, "x", Some(&good)).await.0, 200, "{alg}");
        let confused = jwt_tool(&[
            "confuse",
            dir.join(format!("{kind}.pub")).to_str().unwrap(),
            &grant.to_string(),
        ]);
        assert_eq!(
            publish(&server, "x", Some(&confused)).await.0,
            401,
            "{alg} confusion"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sse_takes_the_token_from_the_query_or_the_cookie_and_checks_the_channel() {
    let server = secured().await;
    let token = hs256(json!({"sub": "bob", "exp": "+600", "tidings": {"subscribe": ["chat:*"]}}));
    let url = &server.url;
    let status = |res: reqwest::Response| res.status().as_u16();
    assert_eq!(
        status(
            server
                .http
                .get(format!("{url}/sse/chat:a"))
                .send()
                .await
                .unwrap()
        ),
        401
    );
    let res = server
        .http
        .get(format!("{url}/sse/chat:a?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = server
        .http
        .get(format!("{url}/sse/chat:a"))
        .header("cookie", format!("theme=dark; tidings_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = server
        .http
        .get(format!("{url}/sse/news?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = server
        .http
        .get(format!("{url}/sse/public:x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "a namespace open to anyone needs no token"
    );
    let res = server
        .http
        .get(format!(
            "{url}/poll?channel=chat:a&channel=news&token={token}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        403,
        "every channel of a subscription is checked"
    );
}

#[tokio::test]
async fn a_stream_ends_with_token_expired_when_its_token_does_plus_the_leeway() {
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let server = secured().await;
    // jwt_tool mints exp = now (whole seconds) + 2, so exp is at least this.
    let exp_at_least = unix_now().floor() + 2.0;
    let token = hs256(json!({"exp": "+2", "tidings": {"subscribe": ["*"]}}));
    let res = server
        .http
        .get(format!("{}/stream/chat:a", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut text = String::new();
    let ended = tokio::time::timeout(TIMEOUT, async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token");
    assert!(
        text.contains(r#"{"type":"disconnect","reason":"token_expired","reconnect":true}"#),
        "{text}"
    );
    // docs/security.md: the disconnect comes at exp + 5 s (the clock-skew leeway), not at exp.
    let ended_at = unix_now();
    assert!(
        ended_at >= exp_at_least + 5.0,
        "ended {:.2} s after exp, before the 5 s leeway ran out",
        ended_at - exp_at_least
    );
}

#[tokio::test]
async fn the_api_is_for_api_keys_once_auth_is_on() {
    let server = secured().await;
    let user = hs256(json!({"exp": "+600", "tidings": {"subscribe": ["*"]}}));
    let get = |token: Option<String>| {
        let mut req = server.http.get(format!("{}/api/channels", server.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some(user)).await, 403);
    assert_eq!(get(Some(API_KEY.into())).await, 200);
}

#[tokio::test]
async fn websockets_check_credentials_before_the_upgrade_and_grants_per_op() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let server = secured().await;
    let ws_url = server.url.replacen("http://", "ws://", 1);
    let err = tokio_tungstenite::connect_async(format!("{ws_url}/ws?token=garbage"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let err = tokio_tungstenite::connect_async(format!("{ws_url}/ws/chat:a"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let token = hs256(json!({"exp": "+600", "tidings": {"subscribe": ["chat:*"], "publish": []}}));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}/ws?token={token}"))
        .await
        .unwrap();
    let mut replies = Vec::new();
    for op in [
        json!({"id": 1, "op": "subscribe", "channel": "chat:a"}),
        json!({"id": 2, "op": "subscribe", "channel": "news"}),
        json!({"id": 3, "op": "publish", "channel": "chat:a", "data": 1}),
    ] {
        ws.send(Ws::text(op.to_string())).await.unwrap();
        loop {
            let frame = tokio::time::timeout(TIMEOUT, ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Ws::Text(t) = frame {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "reply" {
                    replies.push(v);
                    break;
                }
            }
        }
    }
    assert_eq!(replies[0]["ok"], true);
    assert_eq!(replies[1]["error"]["code"], "forbidden");
    assert_eq!(replies[2]["error"]["code"], "forbidden");
    // A foreign Origin is refused before the upgrade (auth on, empty allow-list = none).
    let mut req = format!("{ws_url}/ws?token={token}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
}

#[tokio::test]
async fn cors_preflights_are_allowed_for_listed_origins_and_refused_for_others() {
    let server = TestServer::with(|c| {
        c.auth.api_keys = vec![Secret(API_KEY.into())];
        c.server.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        server
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/publish/chat:a", server.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(ok.status(), 204);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        ok.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    let denied = preflight("https://evil.example").await.unwrap();
    assert_eq!(denied.status(), 403);
    // Simple requests: the header only for the allowed origin.
    let res = server
        .http
        .get(format!("{}/healthz", server.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    // Open mode with an empty list: any origin.
    let open = TestServer::spawn().await;
    let res = open
        .http
        .get(format!("{}/poll/x", open.url))
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://anywhere.example"
    );
}

#[tokio::test]
async fn a_client_connection_over_its_publish_rate_gets_429_but_backends_do_not() {
    let server = TestServer::with(|c| {
        c.auth.api_keys = vec![Secret(API_KEY.into())];
        c.auth.jwt_secret = Some(Secret(SECRET.into()));
        c.server.client_publish_rate = 5;
    })
    .await;
    let user = hs256(json!({"exp": "+600", "tidings": {"publish": ["*"]}}));
    // reqwest keeps one connection alive for sequential requests.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(publish(&server, "fast", Some(&user)).await.0);
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert!(statuses[5..].contains(&429), "{statuses:?}");
    for _ in 0..20 {
        assert_eq!(publish(&server, "fast", Some(API_KEY)).await.0, 200);
    }
}

/// docs/security.md, "The `admin` namespace is the exception": only API keys publish there,
/// whatever a user token grants, over HTTP and `/ws` alike.
#[tokio::test]
async fn only_api_keys_publish_to_the_admin_namespace_even_with_a_star_grant() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Ws;

    let server = secured().await;
    let star = hs256(json!({"exp": "+600", "tidings": {"subscribe": ["*"], "publish": ["*"]}}));
    let (status, body, _) = publish(&server, "admin:notes", Some(&star)).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    assert_eq!(publish(&server, "admin:notes", None).await.0, 401);
    assert_eq!(publish(&server, "admin:notes", Some(API_KEY)).await.0, 200);
    let ws_url = server.url.replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}/ws?token={star}"))
        .await
        .unwrap();
    let op = json!({"id": 1, "op": "publish", "channel": "admin:notes", "data": 1});
    ws.send(Ws::text(op.to_string())).await.unwrap();
    let reply = loop {
        let frame = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ws::Text(t) = frame {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "reply" {
                break v;
            }
        }
    };
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    let info: Value = server
        .http
        .get(format!("{}/api/channels/admin:notes", server.url))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info["offset"], 1,
        "only the API key's publish was stored: {info}"
    );
}

/// docs/security.md's status table: a 429 carries `Retry-After: 1`.
#[tokio::test]
async fn a_publish_over_the_rate_gets_429_with_retry_after() {
    let server = TestServer::with(|c| {
        c.auth.jwt_secret = Some(Secret(SECRET.into()));
        c.server.client_publish_rate = 1;
    })
    .await;
    let user = hs256(json!({"exp": "+600", "tidings": {"publish": ["*"]}}));
    let mut refused = None;
    for _ in 0..5 {
        let res = server
            .http
            .post(format!("{}/publish/fast", server.url))
            .header("content-type", "text/plain")
            .bearer_auth(&user)
            .body("x")
            .send()
            .await
            .unwrap();
        if res.status() == 429 {
            refused = Some(res);
            break;
        }
    }
    let res = refused.expect("no 429 within 5 publishes at 1 per second");
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
}

/// The server's own origin is recognised over HTTP/2 too (`:authority`, no `Host`), so its
/// own pages' preflights and WebSockets work under `[auth]` with an empty allow-list.
#[tokio::test]
async fn the_servers_own_origin_is_allowed_over_h2c_and_a_foreign_one_is_not() {
    let server = secured().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let preflight = |origin: String| {
        h2.request(
            reqwest::Method::OPTIONS,
            format!("{}/publish/chat:a", server.url),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .send()
    };
    let own = preflight(server.url.clone()).await.unwrap();
    assert_eq!(own.version(), reqwest::Version::HTTP_2);
    assert_eq!(own.status(), 204);
    let foreign = preflight("https://evil.example".into()).await.unwrap();
    assert_eq!(foreign.status(), 403);
}

/// docs/security.md: credentials are checked before a chunked body is read; a body of declared
/// length (up to 64 KiB) is read first, so one that never arrives gets `408`, not `401`.
#[tokio::test]
async fn a_bad_token_is_refused_before_a_chunked_body_and_after_a_declared_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::with(|c| {
        c.auth.api_keys = vec![Secret(API_KEY.into())];
        c.server.request_body_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let first_reply = |head: &'static str| {
        let addr = server.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            tokio::time::timeout(TIMEOUT, async {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
            .await
            .unwrap()
        }
    };
    let chunked = first_reply(
        "POST /publish/x HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-key-0123456789\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 401"), "{chunked}");
    let declared = first_reply(
        "POST /publish/x HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-key-0123456789\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n",
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 408"), "{declared}");
}
