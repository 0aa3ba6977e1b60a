//! The Lua scripts the daemon runs in Redis, and the typed calls to them.
//!
//! Every step that must be atomic across daemons is one script, because Redis runs a script from
//! start to end with nothing in between: the lock's `SET NX PX` and its fencing token; compare-and-act
//! on the owner token for release and extend; the fence check, the write, the write-sequence bump and
//! the invalidation of a cache write; a read together with the sequence it is current at. The scripts
//! are loaded when the link connects (`SCRIPT LOAD`) and run with `EVALSHA`; after a Redis restart or
//! `SCRIPT FLUSH` the `NOSCRIPT` answer makes the call load the script and run it again.
//!
//! Numbers: Lua numbers are doubles, exact for integers below 2⁵³ (about 9 × 10¹⁵). Fencing tokens
//! (microseconds since 1970, about 1.7 × 10¹⁵) are computed as doubles and stored as decimal strings
//! written with `%.0f`; the fenced-write check compares those strings for equality, exact at any size.
//! docs/coherence.md argues why the tokens stay ordered across daemons, restarts and degraded mode.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;

use super::pipe::Pipe;
use super::resp::{Command, Reply};
use super::{expect_ok, Keys, Link, LinkError};

/// How long a lock's newest fencing token is kept in Redis after the lock last became free, so a
/// fenced write from its last holder is still checked against it. The same hour the standalone lock
/// table keeps a record (`locks::FENCE_RETENTION`).
pub const RECORD_RETENTION: Duration = Duration::from_secs(3600);

/// First byte of every value the daemon stores: the format of what follows.
pub const VALUE_FORMAT: u8 = 1;

/// Bytes before the value itself: the format byte and a CRC-32, big-endian.
pub const VALUE_HEADER_LEN: usize = 5;

/// Acquire. KEYS: lock, lock's newest fence, newest fence of any lock, write sequence, lock's waiters
/// mark. ARGV: owner token, lease ms, caller's floor, record retention ms, '1' if the caller will wait.
/// Returns `{1, seq, fence}` when granted (fence as a decimal string), `{0, seq, pttl}` when held. A
/// caller that will wait marks the lock as waited for (until the holder's lease ends, and a second
/// more), so that its release is published.
const ACQUIRE: &str = r"
local seq = tonumber(redis.call('GET', KEYS[4]) or '0')
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local pttl = redis.call('PTTL', KEYS[1])
  if ARGV[5] == '1' then
    redis.call('SET', KEYS[5], '1', 'PX', math.max(pttl, 0) + 1000)
  end
  return {0, seq, pttl}
end
local t = redis.call('TIME')
local fence = math.max(
  tonumber(redis.call('GET', KEYS[3]) or '0') + 1,
  tonumber(t[1]) * 1000000 + tonumber(t[2]),
  tonumber(ARGV[3]) + 1)
local f = string.format('%.0f', fence)
redis.call('SET', KEYS[3], f)
redis.call('SET', KEYS[2], f, 'PX', tonumber(ARGV[2]) + tonumber(ARGV[4]))
return {1, seq, f}
";

/// Release. KEYS: lock, lock's newest fence, lock's waiters mark. ARGV: owner token, release
/// channel, lock name, record retention ms. Returns 1 released, 0 not held, -1 held by another
/// token. The release is published only when someone marked the lock as waited for: an uncontended
/// lock costs no message to every daemon.
const RELEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if holder ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
";

/// Extend. KEYS: lock, lock's newest fence. ARGV: owner token, lease ms, record retention ms.
/// Returns 1 extended, 0 not held, -1 held by another token.
const EXTEND: &str = r"
local holder = redis.call('GET', KEYS[1])
if not holder then return 0 end
if holder ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
";

/// Adopt: take into Redis a lock granted while Redis was away, keeping its owner token and fence.
/// KEYS: as ACQUIRE. ARGV: owner token, lease ms, fence (decimal), record retention ms.
/// Returns `{1, seq}` adopted, `{0, newest}` lost (Redis granted a newer fence since), `{-1, seq}`
/// held by another token.
const ADOPT: &str = r"
local seq = tonumber(redis.call('GET', KEYS[4]) or '0')
local newest = redis.call('GET', KEYS[2])
if newest and tonumber(newest) > tonumber(ARGV[3]) then return {0, newest} end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {-1, seq} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[2]) + tonumber(ARGV[4]))
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[3]) or '0') then
  redis.call('SET', KEYS[3], ARGV[3])
end
return {1, seq}
";

/// Raise the newest fence of any lock to at least the floor. KEYS: newest fence. ARGV: floor.
/// Returns the newest fence after, as a decimal string.
const RAISE_FLOOR: &str = r"
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then return current end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";

/// Write (SET or DEL), optionally fenced. KEYS: value, write sequence, lock's newest fence (any key
/// when unfenced). ARGV: fence token ('' = unfenced), invalidation channel, key name, 'SET' or 'DEL',
/// stored value, ttl ms ('0' = none). Returns `{1, seq, existed}` written, `{0, newest or ''}`
/// refused by the fence.
const WRITE: &str = r"
if ARGV[1] ~= '' then
  local newest = redis.call('GET', KEYS[3])
  if newest ~= ARGV[1] then return {0, newest or ''} end
end
local existed = 0
if ARGV[4] == 'DEL' then
  existed = redis.call('DEL', KEYS[1])
elseif ARGV[6] == '0' then
  redis.call('SET', KEYS[1], ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
end
local seq = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], string.format('%d', seq) .. ' ' .. ARGV[3])
return {1, seq, existed}
";

/// Read. KEYS: value, write sequence. Returns `{0, seq}` missing, `{1, seq, pttl, stored}` present.
const READ: &str = r"
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = redis.call('GET', KEYS[1])
if not v then return {0, seq} end
return {1, seq, redis.call('PTTL', KEYS[1]), v}
";

/// A script and its SHA-1, by which `EVALSHA` names it.
pub struct Lua {
    code: &'static str,
    sha: OnceLock<String>,
}

impl Lua {
    const fn new(code: &'static str) -> Lua {
        Lua {
            code,
            sha: OnceLock::new(),
        }
    }

    /// The SHA-1 of the code, in hex.
    fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| sha1_smol::Sha1::from(self.code).digest().to_string())
    }

    /// `EVALSHA sha numkeys`: the keys and arguments follow.
    fn evalsha(&self, keys: u64) -> Command {
        let mut cmd = Command::new("EVALSHA");
        cmd.arg(self.sha().as_bytes()).uint(keys);
        cmd
    }

    fn load(&self) -> Command {
        let mut cmd = Command::new("SCRIPT");
        cmd.arg(b"LOAD").arg(self.code.as_bytes());
        cmd
    }
}

static ACQUIRE_SCRIPT: Lua = Lua::new(ACQUIRE);
static RELEASE_SCRIPT: Lua = Lua::new(RELEASE);
static EXTEND_SCRIPT: Lua = Lua::new(EXTEND);
static ADOPT_SCRIPT: Lua = Lua::new(ADOPT);
static RAISE_FLOOR_SCRIPT: Lua = Lua::new(RAISE_FLOOR);
static WRITE_SCRIPT: Lua = Lua::new(WRITE);
static READ_SCRIPT: Lua = Lua::new(READ);

/// Every script, for loading at connect.
fn all() -> [&'static Lua; 7] {
    [
        &ACQUIRE_SCRIPT,
        &RELEASE_SCRIPT,
        &EXTEND_SCRIPT,
        &ADOPT_SCRIPT,
        &RAISE_FLOOR_SCRIPT,
        &WRITE_SCRIPT,
        &READ_SCRIPT,
    ]
}

/// `SCRIPT LOAD`s every script on a connection not yet handed out, so calls are plain `EVALSHA`s
/// from the first one.
pub(super) async fn load_all(pipe: &Pipe) -> Result<(), String> {
    for script in all() {
        match expect_ok(pipe, &script.load(), "SCRIPT LOAD").await? {
            Reply::Bulk(sha) if sha == script.sha().as_bytes() => {}
            other => return Err(format!("SCRIPT LOAD answered {other:?}")),
        }
    }
    Ok(())
}

/// Raises Redis's newest fence to `floor` on a connection not yet handed out.
pub(super) async fn raise_floor_on(pipe: &Pipe, keys: &Keys, floor: u64) -> Result<(), String> {
    let mut cmd = RAISE_FLOOR_SCRIPT.evalsha(1);
    key(&mut cmd, keys, "fence", "").uint(floor);
    expect_ok(pipe, &cmd, "raise the fencing floor")
        .await
        .map(drop)
}

/// Appends the key name `<prefix><kind><rest>` to `cmd` without building it first.
fn key<'c>(cmd: &'c mut Command, keys: &Keys, kind: &str, rest: &str) -> &'c mut Command {
    cmd.parts(&[keys.prefix().as_bytes(), kind.as_bytes(), rest.as_bytes()])
}

/// The answer to [`Link::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The lock is this owner token's, with this fencing token, for the lease asked.
    Granted {
        /// The grant's fencing token, above every token Redis issued before.
        fence: u64,
        /// The write sequence when the lock was granted: the read barrier.
        seq: u64,
    },
    /// Another owner token holds the lock.
    Held {
        /// What is left of the holder's lease, when it has one: retry no later than this.
        lease_left: Option<Duration>,
        /// The write sequence now.
        seq: u64,
    },
}

/// The answer to [`Link::release`] and [`Link::extend`]: did the owner token hold the lock?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// It did; the lock was released (and the release published), or its lease set.
    Done,
    /// Nobody holds the lock in Redis (released, or its lease ran out there).
    NotHeld,
    /// Another owner token holds it.
    OtherHolder,
}

/// The answer to [`Link::adopt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// The lock is now held in Redis by the owner token with its own fence.
    Adopted {
        /// The write sequence now: the read barrier.
        seq: u64,
    },
    /// Redis granted the lock with a newer fence since: the local holder has lost it.
    Superseded {
        /// The newer fence.
        newest: u64,
    },
    /// Another owner token holds the lock in Redis now: the local holder has lost it.
    OtherHolder,
}

/// A fenced write's fence: the lock it names and the token it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceCheck<'a> {
    /// The lock key.
    pub lock: &'a str,
    /// The fencing token of a grant of that lock.
    pub token: u64,
}

/// The answer to [`Link::set`] and [`Link::del`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Written, with this write sequence; its invalidation carries the same number.
    Done {
        /// The write's sequence number.
        seq: u64,
        /// DEL: whether Redis held the key. SET: false.
        existed: bool,
    },
    /// Refused: the token is not the lock's newest grant. Nothing was written or published.
    Fenced {
        /// The lock's newest grant in Redis; `None` when Redis has no record of the lock.
        newest: Option<u64>,
    },
}

/// The answer to [`Link::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The write sequence the answer is current at: the value is the newest write of the key up to it.
    pub seq: u64,
    /// The value, checksum verified, or `None` when Redis has no such key.
    pub value: Option<Stored>,
}

/// A value read from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The value as the client stored it (the header stripped).
    pub bytes: Bytes,
    /// Time left to live in Redis; `None` when it never expires. A local copy must not outlive it.
    pub ttl: Option<Duration>,
}

impl Link {
    /// Runs a script: `EVALSHA`, and after a `NOSCRIPT` (Redis restarted or its scripts flushed
    /// since the connection loaded them) `SCRIPT LOAD` and `EVALSHA` again. An error reply is
    /// [`LinkError::Unexpected`]: the scripts raise none.
    async fn run(&self, script: &Lua, cmd: &Command) -> Result<Reply, LinkError> {
        let mut reply = self.call(cmd).await?;
        if reply.error_kind() == Some("NOSCRIPT") {
            match self.call(&script.load()).await? {
                Reply::Error(e) => return Err(LinkError::Unexpected(format!("SCRIPT LOAD: {e}"))),
                _ => reply = self.call(cmd).await?,
            }
        }
        match reply {
            Reply::Error(e) => Err(LinkError::Unexpected(e)),
            reply => Ok(reply),
        }
    }

    /// Tries to take `lock` for `token` with `lease`. The fencing token is above every token Redis
    /// issued before and above [`Link::fence_floor`]; a granted fence is noted (see
    /// [`Link::note_fence`]). `token` must be in one canonical spelling (the daemon's lower-case
    /// UUID), since release and extend compare it byte for byte. A caller that `will_wait` if the
    /// lock is held marks it as waited for, so its release is published on the release channel.
    pub async fn acquire(
        &self,
        lock: &str,
        token: &str,
        lease: Duration,
        will_wait: bool,
    ) -> Result<Acquire, LinkError> {
        let keys = self.keys();
        let mut cmd = ACQUIRE_SCRIPT.evalsha(5);
        key(&mut cmd, keys, Keys::LOCK, lock);
        key(&mut cmd, keys, Keys::FENCE, lock);
        key(&mut cmd, keys, Keys::NEWEST_FENCE, "");
        key(&mut cmd, keys, Keys::SEQ, "");
        key(&mut cmd, keys, Keys::WAITERS, lock);
        cmd.arg(token.as_bytes())
            .uint(millis(lease))
            .uint(self.fence_floor())
            .uint(millis(RECORD_RETENTION))
            .arg(if will_wait { b"1" } else { b"0" });
        let answer = self.run(&ACQUIRE_SCRIPT, &cmd).await?;
        let acquire = match members(&answer) {
            [flag, seq, fence] if int(flag)? == 1 => Acquire::Granted {
                fence: decimal(fence)?,
                seq: uint(seq)?,
            },
            [_, seq, pttl] => Acquire::Held {
                lease_left: u64::try_from(int(pttl)?).ok().map(Duration::from_millis),
                seq: uint(seq)?,
            },
            _ => return Err(unexpected("acquire", &answer)),
        };
        if let Acquire::Granted { fence, .. } = acquire {
            self.note_fence(fence);
        }
        Ok(acquire)
    }

    /// Releases `lock` if `token` holds it, and publishes the release on the release channel if
    /// someone waits for it.
    pub async fn release(&self, lock: &str, token: &str) -> Result<Compare, LinkError> {
        let keys = self.keys();
        let mut cmd = RELEASE_SCRIPT.evalsha(3);
        key(&mut cmd, keys, Keys::LOCK, lock);
        key(&mut cmd, keys, Keys::FENCE, lock);
        key(&mut cmd, keys, Keys::WAITERS, lock);
        cmd.arg(token.as_bytes());
        key(&mut cmd, keys, Keys::RELEASES, "");
        cmd.arg(lock.as_bytes()).uint(millis(RECORD_RETENTION));
        compare(&self.run(&RELEASE_SCRIPT, &cmd).await?)
    }

    /// Sets the lease of `lock` to `lease` from now if `token` holds it.
    pub async fn extend(
        &self,
        lock: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Compare, LinkError> {
        let keys = self.keys();
        let mut cmd = EXTEND_SCRIPT.evalsha(2);
        key(&mut cmd, keys, Keys::LOCK, lock);
        key(&mut cmd, keys, Keys::FENCE, lock);
        cmd.arg(token.as_bytes())
            .uint(millis(lease))
            .uint(millis(RECORD_RETENTION));
        compare(&self.run(&EXTEND_SCRIPT, &cmd).await?)
    }

    /// Takes into Redis a lock this daemon granted while Redis was away, with the grant's own owner
    /// token and fence, unless Redis granted it since or someone holds it there.
    pub async fn adopt(
        &self,
        lock: &str,
        token: &str,
        lease: Duration,
        fence: u64,
    ) -> Result<Adopt, LinkError> {
        let keys = self.keys();
        let mut cmd = ADOPT_SCRIPT.evalsha(4);
        key(&mut cmd, keys, Keys::LOCK, lock);
        key(&mut cmd, keys, Keys::FENCE, lock);
        key(&mut cmd, keys, Keys::NEWEST_FENCE, "");
        key(&mut cmd, keys, Keys::SEQ, "");
        cmd.arg(token.as_bytes())
            .uint(millis(lease))
            .uint(fence)
            .uint(millis(RECORD_RETENTION));
        let answer = self.run(&ADOPT_SCRIPT, &cmd).await?;
        match members(&answer) {
            [flag, seq] if int(flag)? == 1 => Ok(Adopt::Adopted { seq: uint(seq)? }),
            [flag, newest] if int(flag)? == 0 => Ok(Adopt::Superseded {
                newest: decimal(newest)?,
            }),
            [_, _] => Ok(Adopt::OtherHolder),
            _ => Err(unexpected("adopt", &answer)),
        }
    }

    /// Raises Redis's newest fence of any lock to at least `floor` now; returns the newest after.
    /// The connector does this on every connect with [`Link::fence_floor`]; this is for callers that
    /// must be sure before going on.
    pub async fn raise_fence_floor(&self, floor: u64) -> Result<u64, LinkError> {
        let mut cmd = RAISE_FLOOR_SCRIPT.evalsha(1);
        key(&mut cmd, self.keys(), Keys::NEWEST_FENCE, "").uint(floor);
        decimal(&self.run(&RAISE_FLOOR_SCRIPT, &cmd).await?)
    }

    /// Stores `value` under `key` (with `ttl`, or none), checked against `fence` when given, bumping
    /// the write sequence and publishing the invalidation in the same step.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        fence: Option<FenceCheck<'_>>,
    ) -> Result<Write, LinkError> {
        let ttl_ms = ttl.map_or(0, |t| millis(t).max(1));
        self.write(key, "SET", Some(value), ttl_ms, fence).await
    }

    /// Deletes `key`, checked against `fence` when given, bumping the write sequence and publishing
    /// the invalidation in the same step.
    pub async fn del(&self, key: &str, fence: Option<FenceCheck<'_>>) -> Result<Write, LinkError> {
        self.write(key, "DEL", None, 0, fence).await
    }

    async fn write(
        &self,
        name: &str,
        op: &str,
        value: Option<&[u8]>,
        ttl_ms: u64,
        fence: Option<FenceCheck<'_>>,
    ) -> Result<Write, LinkError> {
        let keys = self.keys();
        let mut cmd = WRITE_SCRIPT.evalsha(3);
        key(&mut cmd, keys, Keys::VALUE, name);
        key(&mut cmd, keys, Keys::SEQ, "");
        match fence {
            Some(f) => key(&mut cmd, keys, Keys::FENCE, f.lock),
            None => key(&mut cmd, keys, Keys::VALUE, name),
        };
        match fence {
            Some(f) => cmd.uint(f.token),
            None => cmd.arg(b""),
        };
        key(&mut cmd, keys, Keys::INVALIDATIONS, "");
        cmd.arg(name.as_bytes()).arg(op.as_bytes());
        match value {
            // The stored form, written in parts: the header, then the value, never copied whole.
            Some(value) => cmd.parts(&[&stored_header(value), value]),
            None => cmd.arg(b""),
        };
        cmd.uint(ttl_ms);
        let answer = self.run(&WRITE_SCRIPT, &cmd).await?;
        match members(&answer) {
            [flag, seq, existed] if int(flag)? == 1 => Ok(Write::Done {
                seq: uint(seq)?,
                existed: int(existed)? > 0,
            }),
            [_, newest] => Ok(Write::Fenced {
                newest: match newest {
                    Reply::Bulk(b) if b.is_empty() => None,
                    other => Some(decimal(other)?),
                },
            }),
            _ => Err(unexpected("write", &answer)),
        }
    }

    /// Reads `key` and the write sequence it is current at, in one step. A value that fails its
    /// checksum is [`LinkError::Corrupted`], never returned.
    pub async fn read(&self, name: &str) -> Result<Read, LinkError> {
        let keys = self.keys();
        let mut cmd = READ_SCRIPT.evalsha(2);
        key(&mut cmd, keys, Keys::VALUE, name);
        key(&mut cmd, keys, Keys::SEQ, "");
        let answer = self.run(&READ_SCRIPT, &cmd).await?;
        match members(&answer) {
            [_, seq] => Ok(Read {
                seq: uint(seq)?,
                value: None,
            }),
            [_, seq, pttl, Reply::Bulk(stored)] => {
                decode_value(stored).map_err(|reason| LinkError::Corrupted {
                    key: name.to_string(),
                    reason,
                })?;
                Ok(Read {
                    seq: uint(seq)?,
                    value: Some(Stored {
                        // The reply's own buffer, past the header: no copy.
                        bytes: stored.slice(VALUE_HEADER_LEN..),
                        ttl: u64::try_from(int(pttl)?).ok().map(Duration::from_millis),
                    }),
                })
            }
            _ => Err(unexpected("read", &answer)),
        }
    }

    /// The write sequence now (0 before the first write).
    pub async fn write_seq(&self) -> Result<u64, LinkError> {
        let mut cmd = Command::new("GET");
        key(&mut cmd, self.keys(), Keys::SEQ, "");
        match self.call(&cmd).await? {
            Reply::Nil => Ok(0),
            other => decimal(&other),
        }
    }
}

/// The header of a value's stored form: [`VALUE_FORMAT`] and the value's CRC-32, big-endian.
fn stored_header(value: &[u8]) -> [u8; VALUE_HEADER_LEN] {
    let crc = crc32fast::hash(value).to_be_bytes();
    [VALUE_FORMAT, crc[0], crc[1], crc[2], crc[3]]
}

/// The stored form of a value: [`VALUE_FORMAT`], the CRC-32 of the value (big-endian), the value.
pub fn encode_value(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER_LEN + value.len());
    out.extend_from_slice(&stored_header(value));
    out.extend_from_slice(value);
    out
}

/// The value inside a stored form, or why it is not one: too short, another format, or a checksum
/// that does not match.
pub fn decode_value(stored: &[u8]) -> Result<&[u8], String> {
    let Some((header, value)) = stored.split_at_checked(VALUE_HEADER_LEN) else {
        return Err(format!("{} bytes, shorter than the header", stored.len()));
    };
    if header[0] != VALUE_FORMAT {
        return Err(format!(
            "format byte {:#04x}, not {VALUE_FORMAT:#04x}",
            header[0]
        ));
    }
    let want = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let got = crc32fast::hash(value);
    if want != got {
        return Err(format!("checksum {got:08x}, stored {want:08x}"));
    }
    Ok(value)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn compare(answer: &Reply) -> Result<Compare, LinkError> {
    match int(answer)? {
        1 => Ok(Compare::Done),
        0 => Ok(Compare::NotHeld),
        -1 => Ok(Compare::OtherHolder),
        other => Err(LinkError::Unexpected(format!(
            "compare-and-act answered {other}"
        ))),
    }
}

/// The members of an array reply; none for anything else.
fn members(reply: &Reply) -> &[Reply] {
    match reply {
        Reply::Array(all) => all,
        _ => &[],
    }
}

fn int(v: &Reply) -> Result<i64, LinkError> {
    match v {
        Reply::Int(i) => Ok(*i),
        other => Err(LinkError::Unexpected(format!(
            "{other:?} where an integer belongs"
        ))),
    }
}

fn uint(v: &Reply) -> Result<u64, LinkError> {
    let i = int(v)?;
    u64::try_from(i).map_err(|_| LinkError::Unexpected(format!("negative number {i}")))
}

/// A fencing token: a decimal string (or, from a script returning a number, an integer).
fn decimal(v: &Reply) -> Result<u64, LinkError> {
    match v {
        Reply::Bulk(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                LinkError::Unexpected(format!(
                    "`{}` where a decimal belongs",
                    String::from_utf8_lossy(b)
                ))
            }),
        other => uint(other),
    }
}

fn unexpected(script: &str, answer: &Reply) -> LinkError {
    LinkError::Unexpected(format!("{script} script answered {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip_and_any_changed_byte_is_caught() {
        let value = b"\x00session state\xff";
        let stored = encode_value(value);
        assert_eq!(stored.len(), VALUE_HEADER_LEN + value.len());
        assert_eq!(decode_value(&stored), Ok(&value[..]));
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x01;
            assert!(decode_value(&bad).is_err(), "a flip at byte {i} passed");
        }
        assert!(decode_value(b"").is_err());
        assert!(decode_value(b"plain text someone else wrote").is_err());
        assert_eq!(decode_value(&encode_value(b"")), Ok(&b""[..]));
    }
}
