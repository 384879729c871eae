//! The broker conformance suite, unchanged, against the memory broker writing through a data
//! dir (`fsync = "batch"`, real files and fsyncs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tidings_core::broker::memory::{MemoryBroker, Restore};
use tidings_core::conformance::BrokerFactory;
use tidings_core::policy::LivePolicies;
use tidings_core::{Broker, Fsync, Hub};

/// The history cache size (messages per channel kept in RAM).
struct Durable(usize);

#[async_trait]
impl BrokerFactory for Durable {
    async fn make(&self, hub: Arc<Hub>, policies: Arc<LivePolicies>) -> Arc<dyn Broker> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidings-conformance-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut restore = Restore::new(policies.clone()).with_cache(self.0);
        let (store, _) = tidings_store::open(&dir, tidings_store::Options::default(), &mut |r| {
            restore.apply(r)
        })
        .unwrap();
        // The open files keep working once their names are gone (no segment is started in
        // these short runs), so nothing is left behind in the temp dir.
        std::fs::remove_dir_all(&dir).unwrap();
        MemoryBroker::durable(hub, policies, restore, Box::new(store), Fsync::Batch).unwrap()
    }
}

tidings_core::broker_conformance_suite!(Durable(16));

/// Every read past the newest message comes from disk.
mod with_a_cache_of_one {
    use super::*;
    tidings_core::broker_conformance_suite!(Durable(1));
}

/// Nothing in RAM: every read comes from disk.
mod with_no_cache {
    use super::*;
    tidings_core::broker_conformance_suite!(Durable(0));
}
