//! One `tidings` command run to completion, as the CLI's tests run it: stdin from `input`
//! when given, bounded by `within` (on timeout the child is dropped, which kills it), and
//! the checks on how it ended with what it printed in the failure message.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Runs `bin ARGS` (see `command`) to completion within `within`.
pub async fn run(bin: &str, args: &[&str], input: Option<&[u8]>, within: Duration) -> Output {
    let mut cmd = crate::command(bin);
    cmd.args(args);
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawning tidings");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).await.unwrap();
        drop(stdin);
    }
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tidings {args:?} did not exit within {within:?}"))
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `out` of `tidings ARGS` succeeded; answers its stdout.
pub fn succeeded(args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "tidings {args:?} failed ({})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `out` of `tidings ARGS` failed (and, when `quietly`, printed nothing on stdout); answers
/// its stderr.
pub fn failed(args: &[&str], out: &Output, quietly: bool) -> String {
    assert!(
        !out.status.success() && (!quietly || out.stdout.is_empty()),
        "tidings {args:?} should have failed{}\nstdout: {}\nstderr: {}",
        if quietly { " quietly" } else { "" },
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}
