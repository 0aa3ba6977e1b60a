//! Micro-benchmarks of the session cache alone, without sockets or decoding: what one GET or SET costs
//! inside the daemon once the request is parsed.
//!
//! Run with `cargo bench --bench cache`. Limits follow the daemon's defaults: 10 000 entries (so the
//! cache splits into shards), no byte bound, and 100-byte values. Each operation reads the clock for its
//! `now`, as the daemon does; `cache/clock_only` measures that read alone.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio::time::Instant;

use scaled::cache::{CacheLimits, SessionCache};

/// CACHE_SIZE's default.
const ENTRIES: usize = 10_000;

/// Bytes per value.
const VALUE_LEN: usize = 100;

fn limits() -> CacheLimits {
    CacheLimits {
        max_entries: ENTRIES,
        max_bytes: None,
        shards: 0,
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}:{i:08}")).collect()
}

/// A cache holding `ENTRIES` keys named `session:N`, and those keys.
fn full_cache() -> (SessionCache, Vec<String>) {
    let cache = SessionCache::new(limits());
    let keys = keys("session", ENTRIES);
    let value = Bytes::from(vec![b'x'; VALUE_LEN]);
    let now = Instant::now();
    for k in &keys {
        cache.set(k, value.clone(), None, now).expect("value fits");
    }
    (cache, keys)
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache");
    let value = Bytes::from(vec![b'x'; VALUE_LEN]);

    // What every operation below pays for its `now` argument, to subtract when comparing.
    group.bench_function("clock_only", |b| b.iter(|| black_box(Instant::now())));

    let (cache, present) = full_cache();
    let mut i = 0;
    group.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 1) % present.len();
            black_box(cache.get(black_box(&present[i]), Instant::now()))
        })
    });

    let absent = keys("absent", ENTRIES);
    let mut i = 0;
    group.bench_function("get_miss", |b| {
        b.iter(|| {
            i = (i + 1) % absent.len();
            black_box(cache.get(black_box(&absent[i]), Instant::now()))
        })
    });

    let mut i = 0;
    group.bench_function("set_overwrite", |b| {
        b.iter(|| {
            i = (i + 1) % present.len();
            cache.set(black_box(&present[i]), value.clone(), None, Instant::now())
        })
    });

    // Keys never seen before, into a full cache: every SET inserts one entry and evicts another.
    let (cache, _) = full_cache();
    let fresh = keys("fresh", 1 << 20);
    let mut i = 0;
    group.bench_function("set_insert_evict", |b| {
        b.iter(|| {
            i = (i + 1) % fresh.len();
            cache.set(black_box(&fresh[i]), value.clone(), None, Instant::now())
        })
    });
    group.finish();
}

/// Two threads on one cache: the measured thread does GETs and SETs (3:1) while a second thread does
/// the same mix in a loop, so shard mutexes are sometimes contended.
fn contended(c: &mut Criterion) {
    let (cache, present) = full_cache();
    let cache = Arc::new(cache);
    let present = Arc::new(present);
    let value = Bytes::from(vec![b'x'; VALUE_LEN]);
    let stop = Arc::new(AtomicBool::new(false));

    let other = {
        let (cache, present, value, stop) =
            (cache.clone(), present.clone(), value.clone(), stop.clone());
        thread::spawn(move || {
            let mut i = present.len() / 2;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 7) % present.len();
                if i % 4 == 0 {
                    let _ = cache.set(&present[i], value.clone(), None, Instant::now());
                } else {
                    black_box(cache.get(&present[i], Instant::now()));
                }
            }
        })
    };

    let mut i = 0;
    c.bench_function("cache/mix_2_threads", |b| {
        b.iter(|| {
            i = (i + 1) % present.len();
            if i % 4 == 0 {
                let _ = cache.set(black_box(&present[i]), value.clone(), None, Instant::now());
            } else {
                black_box(cache.get(black_box(&present[i]), Instant::now()));
            }
        })
    });

    stop.store(true, Ordering::Relaxed);
    let _ = other.join();
}

criterion_group!(benches, single_thread, contended);
criterion_main!(benches);
