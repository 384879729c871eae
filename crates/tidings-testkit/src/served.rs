//! A running `tidings serve` process (`Served`): spawned from a `command()`, ready once it
//! printed `tidings listening on URL`, its stderr kept as a log for failure messages, killed
//! when dropped (also when a test panics). One copy for every CLI test file that runs a
//! server as a process (it was copied in four).

use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Served {
    pub child: Child,
    /// `http://ADDR` from the first `tidings listening on` line.
    pub url: String,
    log: Arc<Mutex<String>>,
    /// The task copying stderr into `log`; ends at the process's end of stderr.
    drain: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Served {
    /// Spawns `cmd` (stderr must be piped, as `command()` sets it) and waits up to `within`
    /// for it to listen. `Err` with what it printed when it exits first; panics, with the
    /// same, when it neither listens nor exits in time.
    pub async fn start(mut cmd: Command, within: Duration) -> Result<Self, String> {
        let mut child = cmd.spawn().expect("spawning tidings serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
        let mut seen = String::new();
        let url = loop {
            let line = tokio::time::timeout(within, lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!("tidings serve printed no address in {within:?}:\n{seen}")
                })
                .unwrap_or(None);
            let Some(line) = line else {
                let status = child.wait().await;
                seen.push_str(&format!("(exited: {status:?})\n"));
                return Err(seen);
            };
            seen.push_str(&line);
            seen.push('\n');
            if let Some(url) = line.strip_prefix("tidings listening on ") {
                break url.trim().to_owned();
            }
        };
        // Keep draining stderr, so the server never blocks on a full pipe; keep it for failures.
        let log = Arc::new(Mutex::new(seen));
        let drain = tokio::spawn({
            let log = log.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        Ok(Self {
            child,
            url,
            log,
            drain: Some(drain),
        })
    }

    /// `start`, panicking with the log when the server exits instead of listening.
    pub async fn listening(cmd: Command, within: Duration) -> Self {
        match Self::start(cmd, within).await {
            Ok(served) => served,
            Err(log) => panic!("tidings serve exited before listening:\n{log}"),
        }
    }

    /// Everything the server printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `ADDR` of `url`.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Sends `kill -NAME` (`TERM`, `HUP`, `INT`, `KILL`) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the server is running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Kills the process and returns everything it printed, to the last line.
    pub async fn kill_and_log(mut self, within: Duration) -> String {
        let _ = self.child.start_kill();
        self.exit(within).await;
        if let Some(drain) = self.drain.take() {
            let _ = tokio::time::timeout(within, drain).await;
        }
        self.log()
    }

    /// Waits up to `within` for the process to exit.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "tidings serve still running after {within:?}:\n{}",
                    self.log()
                )
            })
            .expect("waiting for tidings serve")
    }
}
