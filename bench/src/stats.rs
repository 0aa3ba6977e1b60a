//! The daemon's own counters, read with STATS before and after a run, so the report can give the cache
//! hit rate and the lock contention of the run alone (the daemon's figures are since its start).

use rmpv::Value;

use scaled_client::frame::push_frame;
use scaled_client::proto::{CommandName, Request, Response};

use crate::net::{Conn, Endpoint};

/// The STATS members the report uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    /// `cache.hits`.
    pub hits: u64,
    /// `cache.misses`.
    pub misses: u64,
    /// `locks.requests`: LOCKs counted since start.
    pub lock_requests: u64,
    /// `locks.contention`, in percent of `lock_requests`.
    pub contention_pct: f64,
}

impl Snapshot {
    /// Reads STATS on a connection of its own.
    pub async fn fetch(endpoint: &Endpoint) -> Result<Snapshot, String> {
        let mut conn = Conn::open(endpoint, false).await?;
        push_frame(
            &mut conn.out,
            &Request::new(2, CommandName::Stats).to_msgpack(),
        );
        conn.flush().await?;
        let body = conn.next_frame().await?;
        let response = Response::decode(&body).map_err(|e| format!("STATS answer: {e}"))?;
        if let Some(err) = response.err {
            return Err(format!("STATS: {}: {}", err.code, err.message));
        }
        let doc = &response.ok;
        let uint = |section: &str, name: &str| member(doc, section, name).and_then(Value::as_u64);
        let missing = |name: &str| format!("STATS answer without {name}");
        Ok(Snapshot {
            hits: uint("cache", "hits").ok_or_else(|| missing("cache.hits"))?,
            misses: uint("cache", "misses").ok_or_else(|| missing("cache.misses"))?,
            lock_requests: uint("locks", "requests").ok_or_else(|| missing("locks.requests"))?,
            contention_pct: member(doc, "locks", "contention")
                .and_then(Value::as_f64)
                .ok_or_else(|| missing("locks.contention"))?,
        })
    }

    /// STATS of every daemon, added up (contention as the share of all their LOCKs).
    pub async fn fetch_all(endpoints: &[Endpoint]) -> Result<Snapshot, String> {
        let mut sum = Snapshot::default();
        let mut contended = 0.0;
        for endpoint in endpoints {
            let one = Snapshot::fetch(endpoint).await?;
            sum.hits += one.hits;
            sum.misses += one.misses;
            sum.lock_requests += one.lock_requests;
            contended += one.contention_pct / 100.0 * one.lock_requests as f64;
        }
        if sum.lock_requests > 0 {
            sum.contention_pct = 100.0 * contended / sum.lock_requests as f64;
        }
        Ok(sum)
    }

    /// Cache hits over GETs between `self` and `later`, as a fraction; `None` without GETs.
    pub fn hit_rate(&self, later: &Snapshot) -> Option<f64> {
        let hits = later.hits.saturating_sub(self.hits);
        let gets = hits + later.misses.saturating_sub(self.misses);
        (gets > 0).then(|| hits as f64 / gets as f64)
    }

    /// LOCKs that found the lock held over all LOCKs between `self` and `later`, as a fraction;
    /// `None` without LOCKs. The daemon reports contention as a percentage since its start, rounded
    /// to two decimals, so the count of contended LOCKs is recovered from it: exact for a fresh
    /// daemon, within 0.005 % of the daemon's lifetime LOCKs otherwise.
    pub fn contention(&self, later: &Snapshot) -> Option<f64> {
        let contended = |s: &Snapshot| (s.contention_pct / 100.0 * s.lock_requests as f64).round();
        let requests = later.lock_requests.saturating_sub(self.lock_requests);
        (requests > 0)
            .then(|| ((contended(later) - contended(self)) / requests as f64).clamp(0.0, 1.0))
    }
}

/// `doc[section][name]`.
fn member<'a>(doc: &'a Value, section: &str, name: &str) -> Option<&'a Value> {
    let find = |map: &'a Value, key: &str| {
        map.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    };
    find(find(doc, section)?, name)
}
