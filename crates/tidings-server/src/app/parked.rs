//! Probe: sizes of what a parked connection holds (temporary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use crate::app::service::App;
use crate::config::Config;
use crate::net::ConnectionCtx;
use crate::net::listener::{Edge, connection};
use crate::state::AppState;

#[tokio::test]
async fn print_sizes() {
    let state = AppState::new(Config::default()).unwrap();
    let app = Arc::new(App::new(state.clone()));
    let edge = Arc::new(Edge::new(app, tokio_util::task::TaskTracker::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let stream = crate::net::deadline::Deadline::new(stream, std::time::Duration::from_secs(1));
    let ctx = ConnectionCtx {
        peer,
        kill: tokio_util::sync::CancellationToken::new(),
        http2: false,
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permit = state.limits.try_acquire(peer.ip()).ok().unwrap();
    let fut = connection(edge, stream, ctx, graceful.watcher(), None, permit);
    eprintln!("connection task future: {}", std::mem::size_of_val(&fut));
    eprintln!(
        "Notified: {}",
        std::mem::size_of::<tokio::sync::futures::Notified<'static>>()
    );
    eprintln!(
        "Sleep: {}",
        std::mem::size_of::<tokio::time::Sleep>()
    );
    eprintln!(
        "WaitForCancellationFuture: {}",
        std::mem::size_of::<tokio_util::sync::WaitForCancellationFuture<'static>>()
    );
}

#[tokio::test]
async fn print_inner_sizes() {
    use crate::net::h1;
    let state = AppState::new(Config::default()).unwrap();
    let app = App::new(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (stream, peer) = listener.accept().await.unwrap();
    let mut stream = crate::net::deadline::Deadline::new(stream, std::time::Duration::from_secs(1));
    let ctx = ConnectionCtx {
        peer,
        kill: tokio_util::sync::CancellationToken::new(),
        http2: false,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let lean = h1::Lean {
        service: &app,
        ctx: &ctx,
        header_timeout: std::time::Duration::from_secs(1),
        body_timeout: std::time::Duration::from_secs(1),
        shutdown: &shutdown,
    };
    {
        let f = lean.serve(&mut stream);
        eprintln!("Lean::serve: {}", std::mem::size_of_val(&f));
        let f = std::pin::pin!(f);
        let d = crate::net::listener::drive(f, &ctx.kill);
        eprintln!("drive: {}", std::mem::size_of_val(&d));
    }
    let mut buf = bytes::BytesMut::new();
    {
        let f = h1::write_body(&mut stream, Vec::new(), h1::Framing::Chunked, axum::body::Body::empty(), &mut buf);
        eprintln!("write_body: {}", std::mem::size_of_val(&f));
    }
    let mut body = axum::body::Body::empty();
    {
        let mut w = h1::Watch::new(&mut buf);
        let f = h1::next_data(&mut body, &mut stream, &mut w);
        eprintln!("next_data: {}", std::mem::size_of_val(&f));
    }
    {
        let mut w = h1::Watch::new(&mut buf);
        let f = h1::hung_up(&mut stream, &mut w);
        eprintln!("hung_up: {}", std::mem::size_of_val(&f));
    }
    eprintln!("Finish: {}", std::mem::size_of::<crate::app::service::Finish>());
    eprintln!("Deadline<TcpStream>: {}", std::mem::size_of::<crate::net::deadline::Conn>());
    eprintln!("ConnectionCtx: {}", std::mem::size_of::<ConnectionCtx>());
    eprintln!("Body: {}", std::mem::size_of::<axum::body::Body>());
}
