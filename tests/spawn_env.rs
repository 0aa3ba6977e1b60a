//! The one spawn helper clears every setting of the caller's environment, by prefix, so no test's
//! daemon is changed by the environment it happens to run in.

mod common;

use common::TestDaemon;

#[tokio::test]
async fn the_spawn_helper_clears_every_setting_of_the_callers_environment() {
    // Each of these would stop the daemon from starting, or change what it serves, if it got through:
    // REDIS_URL would make the daemon depend on a Redis that is not there (STATS would say so), a
    // bad number makes clap refuse, and the others are names no list of settings has yet, cleared by
    // their prefix alone.
    let settings = [
        ("REDIS_URL", "redis://127.0.0.1:1/"),
        ("SCALED_MAX_CONNECTIONS", "not a number"),
        ("CACHE_SIZE", "0"),
        ("LOCK_TIMEOUT", "NaN"),
        ("SCALED_SETTING_ADDED_LATER", "x"),
        ("REDIS_SETTING_ADDED_LATER", "x"),
    ];
    // This test binary holds only this one test, so changing its environment affects no other test.
    for (name, value) in settings {
        std::env::set_var(name, value);
    }
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client().await;
    let stats = client.stats().await.expect("STATS");
    assert_eq!(stats.cache.max_size, 10_000);
    assert!(!stats.redis.configured);
    for (name, _) in settings {
        std::env::remove_var(name);
    }
}
