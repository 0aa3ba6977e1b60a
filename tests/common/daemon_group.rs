//! Several daemons sharing one Redis, as the app hosts of one deployment do: each `scaled` has its own
//! socket and process, all started with the same `--redis-url`. Tests of cross-host behaviour (mutual
//! exclusion, coherence, hand-off between daemons, Redis failover) start one [`RedisServer`] and a
//! [`DaemonGroup`] on it, then talk to each daemon through its own clients.
//!
//! Every daemon is started through [`TestDaemon::start`], so it gets the same cleared environment as
//! every other test daemon; `extra` flags (for example `--lock-fallback fail`) go to all of them.

use super::redis_server::RedisServer;
use super::TestDaemon;

/// N daemons on one Redis. Each is killed when the group is dropped.
pub struct DaemonGroup {
    /// The daemons, in the order they were started; index them as "host 0", "host 1", ...
    pub daemons: Vec<TestDaemon>,
}

impl DaemonGroup {
    /// Starts `n` daemons with `--redis-url <redis>` and `extra`, each waited for until it serves.
    pub fn start(redis: &RedisServer, n: usize, extra: &[&str]) -> DaemonGroup {
        let url = redis.url();
        let daemons = (0..n)
            .map(|_| {
                let mut args = vec!["--redis-url", url.as_str()];
                args.extend_from_slice(extra);
                TestDaemon::start(&args)
            })
            .collect();
        DaemonGroup { daemons }
    }

    /// Like [`DaemonGroup::start`], then waits until every daemon reports Redis available in STATS,
    /// failing the test after 10 s.
    pub async fn start_available(redis: &RedisServer, n: usize, extra: &[&str]) -> DaemonGroup {
        let group = DaemonGroup::start(redis, n, extra);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        for daemon in &group.daemons {
            let client = daemon.client().await;
            while !client.stats().await.expect("STATS").redis.available {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a daemon did not reach Redis within 10 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        group
    }

    /// The daemon started `i`-th.
    pub fn host(&self, i: usize) -> &TestDaemon {
        &self.daemons[i]
    }

    /// How many daemons there are.
    pub fn len(&self) -> usize {
        self.daemons.len()
    }

    /// Whether the group is empty.
    pub fn is_empty(&self) -> bool {
        self.daemons.is_empty()
    }
}
