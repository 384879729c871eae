//! A spawned process whose stdout is read line by line: third-party clients (curl, Python,
//! Node) in the server's tests, `tidings subscribe` in the CLI's.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The longest any single wait (a line, an exit) may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);
/// The clients' own overall timeout (`TIDINGS_CLIENT_TIMEOUT`): shorter than `WAIT`, so a stuck
/// client exits 3 with its own diagnosis on stderr before this side gives up.
pub const CLIENT_TIMEOUT_SECS: &str = "18";

/// A child process whose stdout is read line by line and whose stderr is kept for failure
/// messages. Killed when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub name: String,
    pub child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `cmd`; `install_hint` says how to get the client when it cannot start.
    pub fn spawn(name: &str, mut cmd: Command, install_hint: &str) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("TIDINGS_CLIENT_TIMEOUT", CLIENT_TIMEOUT_SECS)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({e}); {install_hint}"));
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        tokio::spawn({
            let stderr = stderr.clone();
            async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// What the client printed so far, for failure messages.
    pub fn context(&self) -> String {
        format!(
            "--- {name} stdout so far:\n{}\n--- {name} stderr:\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap(),
            name = self.name
        )
    }

    /// The next stdout line (without its line ending), or `None` at the end of the output.
    pub async fn next_line(&mut self) -> Option<String> {
        match tokio::time::timeout(WAIT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => {
                let line = line.trim_end_matches('\r').to_owned();
                self.seen.push(line.clone());
                Some(line)
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => panic!("reading {}'s stdout: {e}\n{}", self.name, self.context()),
            Err(_) => panic!(
                "{} printed nothing for {WAIT:?}\n{}",
                self.name,
                self.context()
            ),
        }
    }

    pub async fn line(&mut self) -> String {
        match self.next_line().await {
            Some(line) => line,
            None => panic!(
                "{} ended its output early (exit: {:?})\n{}",
                self.name,
                self.child.try_wait(),
                self.context()
            ),
        }
    }

    /// Skips lines until one satisfies `pred`, and returns it.
    pub async fn line_where(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.line().await;
            if pred(&line) {
                return line;
            }
            if self.seen.len() > 10_000 {
                panic!("{} never printed {what}\n{}", self.name, self.context());
            }
        }
    }

    /// Waits until `n` lines in all have been printed.
    pub async fn wait_for_lines(&mut self, n: usize) {
        while self.seen.len() < n {
            if self.next_line().await.is_none() {
                panic!(
                    "{} ended its output after {} lines\n{}",
                    self.name,
                    self.seen.len(),
                    self.context()
                );
            }
        }
    }

    /// Reads stdout to its end and waits for the exit; returns every line the client printed.
    pub async fn finish(&mut self) -> (ExitStatus, Vec<String>) {
        while self.next_line().await.is_some() {}
        let status = match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "{} closed stdout but did not exit\n{}",
                self.name,
                self.context()
            ),
        };
        (status, self.seen.clone())
    }

    /// Like `finish`, and the exit must be a success.
    pub async fn finish_ok(&mut self) -> Vec<String> {
        let (status, lines) = self.finish().await;
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.context()
        );
        lines
    }

    /// Like `finish`, and the exit must be a failure; returns what it wrote to stderr.
    pub async fn finish_err(&mut self) -> String {
        let (status, _) = self.finish().await;
        assert!(
            !status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.context()
        );
        self.stderr.lock().unwrap().clone()
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
