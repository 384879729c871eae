//! The scenario matrix: each file is one behaviour, each behaviour runs over every HTTP
//! transport (raw SSE, envelope SSE, NDJSON stream, long poll, short poll) against a real
//! server on port 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod delivery;
mod disconnect;
mod gap;
mod heartbeat;
mod long_poll;
mod race;
mod resume;
mod slow;
