//! The daemon's request decoder: reads one request envelope straight from the frame's bytes.
//!
//! It is written by hand rather than derived because the envelope is on every request's path and
//! because the protocol's rules are stricter than a generic decoder's: the envelope and `args` must be
//! maps, only str keys name members (any other key is an unknown member and is skipped), a key may not
//! repeat, nil means absent, integers are unsigned, and nothing may follow the map. Strings are read in
//! place and copied only where the request keeps them.

use std::fmt;

use crate::proto::{Args, CommandName, Fence, Request};

/// Deepest nesting an unknown member may have before the request is refused (a guard against
/// arbitrarily deep input, which would otherwise cost stack).
const MAX_SKIP_DEPTH: usize = 32;

/// Why a body is not a request envelope; the text goes into the `MALFORMED` answer.
#[derive(Debug)]
pub(crate) struct Malformed(String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn malformed<T>(message: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(message.into()))
}

/// A read position in a frame body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| Malformed("truncated MessagePack value".into()))?;
        self.buf = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return malformed("truncated MessagePack value");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64, Malformed> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> bool {
        if self.peek() == Some(0xc0) {
            self.buf = &self.buf[1..];
            true
        } else {
            false
        }
    }

    fn map_len(&mut self, what: &str) -> Result<usize, Malformed> {
        match self.byte()? {
            m @ 0x80..=0x8f => Ok(usize::from(m & 0x0f)),
            0xde => Ok(self.be(2)? as usize),
            0xdf => Ok(self.be(4)? as usize),
            _ => malformed(format!("{what} is not a map")),
        }
    }

    /// The length of a str or bin whose 8-, 16- and 32-bit length markers are `markers`, if one of them
    /// is next (marker and length are consumed); `None` leaves the next value unread.
    fn prefixed_len(&mut self, markers: [u8; 3]) -> Result<Option<usize>, Malformed> {
        let Some(width) = self
            .peek()
            .and_then(|m| markers.iter().position(|&k| k == m))
        else {
            return Ok(None);
        };
        self.byte()?;
        Ok(Some(self.be(1 << width)? as usize))
    }

    /// A str, or `None` when the next value is some other type (which is left unread).
    fn str_if_str(&mut self) -> Result<Option<&'a str>, Malformed> {
        let len = match self.peek() {
            Some(m @ 0xa0..=0xbf) => {
                self.byte()?;
                usize::from(m & 0x1f)
            }
            _ => match self.prefixed_len([0xd9, 0xda, 0xdb])? {
                Some(len) => len,
                None => return Ok(None),
            },
        };
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Malformed("a str is not valid UTF-8".into()))
    }

    fn str(&mut self, field: &str) -> Result<&'a str, Malformed> {
        match self.str_if_str()? {
            Some(s) => Ok(s),
            None => malformed(format!("`{field}` is not a str")),
        }
    }

    /// A bin, or a str taken as its UTF-8 bytes.
    fn bytes(&mut self, field: &str) -> Result<&'a [u8], Malformed> {
        match self.prefixed_len([0xc4, 0xc5, 0xc6])? {
            Some(len) => self.take(len),
            None => self.str(field).map(str::as_bytes),
        }
    }

    /// A non-negative integer of any width.
    fn uint(&mut self, field: &str) -> Result<u64, Malformed> {
        let signed =
            |v: i64| u64::try_from(v).map_err(|_| Malformed(format!("`{field}` is negative")));
        match self.byte()? {
            m @ 0x00..=0x7f => Ok(u64::from(m)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            0xd0 => signed(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => signed(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => signed(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => signed(self.be(8)? as i64),
            0xe0..=0xff => malformed(format!("`{field}` is negative")),
            _ => malformed(format!("`{field}` is not an unsigned integer")),
        }
    }

    fn bool(&mut self, field: &str) -> Result<bool, Malformed> {
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            _ => malformed(format!("`{field}` is not a bool")),
        }
    }

    /// Steps over one value of any type.
    fn skip(&mut self, depth: usize) -> Result<(), Malformed> {
        if depth > MAX_SKIP_DEPTH {
            return malformed("a value is nested too deeply");
        }
        let m = self.byte()?;
        let (data, items) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
            0x90..=0x9f => (0, usize::from(m & 0x0f)),
            0xa0..=0xbf => (usize::from(m & 0x1f), 0),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)? as usize),
            0xdd => (0, self.be(4)? as usize),
            0xde => (0, 2 * self.be(2)? as usize),
            0xdf => (0, 2 * self.be(4)? as usize),
            0xc1 => return malformed("0xc1 is not a MessagePack value"),
        };
        self.take(data)?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Ok(())
    }
}

/// Reads the members of a map one key at a time: known str keys go to `member`, which reads the value
/// (nil included: nil means absent, and `member` decides what absence means); unknown keys, str or not,
/// are skipped with their values; a repeated str key is refused.
///
/// The repeat check costs O(1) per member whatever the map's size: a bit per known key, and for
/// unknown keys a hash set with a randomly keyed hash, so no input can make it degrade. Decoding stays
/// linear in the frame's size: a map of a hundred thousand members costs a hundred thousand steps,
/// not their square.
fn each_member<'a>(
    r: &mut Reader<'a>,
    what: &str,
    known: &[&str],
    mut member: impl FnMut(&mut Reader<'a>, &'a str) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    debug_assert!(known.len() <= 64, "a bit per known key");
    let len = r.map_len(what)?;
    let mut seen_known = 0u64;
    let mut seen_unknown = Seen::default();
    for _ in 0..len {
        let Some(key) = r.str_if_str()? else {
            r.skip(0)?;
            r.skip(0)?;
            continue;
        };
        let index = known.iter().position(|k| *k == key);
        let fresh = match index {
            Some(i) => {
                let bit = 1u64 << i;
                let fresh = seen_known & bit == 0;
                seen_known |= bit;
                fresh
            }
            None => seen_unknown.insert(key),
        };
        if !fresh {
            return malformed(format!("`{}` appears twice in {what}", clipped(key)));
        }
        if index.is_some() {
            member(r, key)?;
        } else {
            r.skip(0)?;
        }
    }
    Ok(())
}

/// The unknown str keys of one map seen so far: none in a well-formed request, a few in one from a
/// newer client, any number in a hostile one. A short list scanned linearly until it passes
/// [`Seen::LIST`] members, then a hash set; nothing allocated until the first.
#[derive(Default)]
struct Seen<'a> {
    list: Vec<&'a str>,
    set: Option<std::collections::HashSet<&'a str>>,
}

impl<'a> Seen<'a> {
    const LIST: usize = 16;

    /// Records `key`; false if it was already there.
    fn insert(&mut self, key: &'a str) -> bool {
        if let Some(set) = &mut self.set {
            return set.insert(key);
        }
        if self.list.contains(&key) {
            return false;
        }
        self.list.push(key);
        if self.list.len() > Self::LIST {
            self.set = Some(self.list.drain(..).collect());
        }
        true
    }
}

/// At most the first 64 bytes of a client's string, for quoting in an error message: an answer's size
/// must not follow the size of what the client sent.
fn clipped(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.into();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

const ENVELOPE: &[&str] = &["id", "cmd", "args", "session_id", "user_id"];
const ARGS: &[&str] = &[
    "version",
    "client",
    "key",
    "value",
    "ttl_ms",
    "wait_ms",
    "try",
    "auto_renew",
    "token",
    "fence",
    "delay_ms",
    "limit",
    "after",
];

/// Decodes a frame body into a request. On failure it returns the id, if one could be read, so the
/// error can still be matched to its caller, and a message saying what was wrong.
pub fn decode_request(body: &[u8]) -> Result<Request, (u64, String)> {
    request(body).map_err(|e| (id_of(body), e.to_string()))
}

/// Decodes one request envelope from a whole frame body.
pub(crate) fn request(body: &[u8]) -> Result<Request, Malformed> {
    let mut r = Reader { buf: body };
    let (mut id, mut cmd, mut args, mut session_id, mut user_id) = (None, None, None, None, None);
    each_member(&mut r, "the request", ENVELOPE, |r, key| {
        if key == "args" && r.peek() == Some(0xc0) {
            return malformed("`args` is nil; omit it instead");
        }
        if r.nil() {
            return Ok(());
        }
        match key {
            "id" => id = Some(r.uint("id")?),
            "cmd" => {
                let name = r.str("cmd")?;
                let known = CommandName::ALL.into_iter().find(|c| c.as_str() == name);
                cmd = Some(known.unwrap_or(CommandName::Unknown));
            }
            "args" => args = Some(arguments(r)?),
            "session_id" => session_id = Some(r.str("session_id")?.to_string()),
            _ => user_id = Some(r.str("user_id")?.to_string()),
        }
        Ok(())
    })?;
    if !r.buf.is_empty() {
        return malformed(format!("{} bytes after the request map", r.buf.len()));
    }
    let id = id.ok_or_else(|| Malformed("missing `id`".into()))?;
    let cmd = cmd.ok_or_else(|| Malformed("missing `cmd`".into()))?;
    Ok(Request {
        id,
        cmd,
        args: args.unwrap_or_default(),
        session_id,
        user_id,
    })
}

fn arguments<'a>(r: &mut Reader<'a>) -> Result<Args, Malformed> {
    let mut a = Args::default();
    each_member(r, "`args`", ARGS, |r, key| {
        if r.nil() {
            return Ok(());
        }
        match key {
            "version" => {
                let v = r.uint("version")?;
                a.version = Some(
                    u32::try_from(v).map_err(|_| Malformed("`version` is out of range".into()))?,
                );
            }
            "client" => a.client = Some(r.str("client")?.to_string()),
            "key" => a.key = Some(r.str("key")?.to_string()),
            "value" => a.value = Some(r.bytes("value")?.to_vec()),
            "ttl_ms" => a.ttl_ms = Some(r.uint("ttl_ms")?),
            "wait_ms" => a.wait_ms = Some(r.uint("wait_ms")?),
            "try" => a.try_only = Some(r.bool("try")?),
            "auto_renew" => a.auto_renew = Some(r.bool("auto_renew")?),
            "token" => a.token = Some(r.str("token")?.to_string()),
            "fence" => a.fence = Some(fence(r)?),
            "limit" => a.limit = Some(r.uint("limit")?),
            "after" => a.after = Some(r.str("after")?.to_string()),
            _ => a.delay_ms = Some(r.uint("delay_ms")?),
        }
        Ok(())
    })?;
    Ok(a)
}

fn fence(r: &mut Reader<'_>) -> Result<Fence, Malformed> {
    let (mut lock, mut token) = (None, None);
    each_member(r, "`fence`", &["lock", "token"], |r, key| {
        if r.nil() {
            return Ok(());
        }
        if key == "lock" {
            lock = Some(r.str("fence.lock")?.to_string());
        } else {
            token = Some(r.uint("fence.token")?);
        }
        Ok(())
    })?;
    match (lock, token) {
        (Some(lock), Some(token)) => Ok(Fence { lock, token }),
        _ => malformed("`fence` needs both `lock` and `token`"),
    }
}

/// The envelope's `id`, if it can be read, for answering a request that is otherwise malformed.
pub(crate) fn id_of(body: &[u8]) -> u64 {
    let mut r = Reader { buf: body };
    let found = (|| -> Result<Option<u64>, Malformed> {
        let len = r.map_len("the request")?;
        for _ in 0..len {
            match r.str_if_str()? {
                Some("id") => return r.uint("id").map(Some),
                Some(_) => r.skip(0)?,
                None => {
                    r.skip(0)?;
                    r.skip(0)?;
                }
            }
        }
        Ok(None)
    })();
    found.ok().flatten().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(value: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, value).expect("encode");
        out
    }

    fn map(members: Vec<(rmpv::Value, rmpv::Value)>) -> Vec<u8> {
        encode(&rmpv::Value::Map(members))
    }

    #[test]
    fn integer_keys_are_unknown_members_not_field_positions() {
        let body = map(vec![
            (0.into(), 99.into()),
            ("id".into(), 5.into()),
            (1.into(), "SET".into()),
            ("cmd".into(), "PING".into()),
        ]);
        let req = request(&body).expect("decodes");
        assert_eq!((req.id, req.cmd), (5, CommandName::Ping));
        let positional = map(vec![(0.into(), 9.into()), (1.into(), "PING".into())]);
        assert!(
            request(&positional).is_err(),
            "integer keys named the members"
        );
    }

    #[test]
    fn strictness_rules_hold() {
        let dup = map(vec![
            ("id".into(), 1.into()),
            ("id".into(), 2.into()),
            ("cmd".into(), "PING".into()),
        ]);
        assert!(request(&dup).is_err());
        let nil_args = map(vec![
            ("id".into(), 1.into()),
            ("cmd".into(), "PING".into()),
            ("args".into(), rmpv::Value::Nil),
        ]);
        assert!(request(&nil_args).is_err());
        let nil_optional = map(vec![
            ("id".into(), 1.into()),
            ("cmd".into(), "PING".into()),
            ("session_id".into(), rmpv::Value::Nil),
        ]);
        assert_eq!(
            request(&nil_optional).expect("nil is absence").session_id,
            None
        );
        let negative = map(vec![
            ("id".into(), (-1).into()),
            ("cmd".into(), "PING".into()),
        ]);
        assert!(request(&negative).is_err());
        let mut trailing = map(vec![("id".into(), 1.into()), ("cmd".into(), "PING".into())]);
        trailing.push(0xc0);
        assert!(request(&trailing).is_err());
        assert_eq!(id_of(&trailing), 1);
        let array = encode(&rmpv::Value::Array(vec![1.into(), "PING".into()]));
        assert!(request(&array).is_err());
    }

    #[test]
    fn a_repeated_key_is_found_however_many_members_come_before_it() {
        // Across the short list's end and into the hash set: the repeat at every place.
        for members in (1..=20).chain([40]) {
            for repeat in 0..members {
                let mut m: Vec<(rmpv::Value, rmpv::Value)> =
                    vec![("id".into(), 1.into()), ("cmd".into(), "PING".into())];
                m.extend((0..members).map(|i| (format!("x{i}").into(), 0.into())));
                m.push((format!("x{repeat}").into(), 1.into()));
                let err = request(&map(m)).expect_err("a repeated key is malformed");
                assert!(
                    err.0.contains("appears twice"),
                    "{members}/{repeat}: {}",
                    err.0
                );
            }
            let mut m: Vec<(rmpv::Value, rmpv::Value)> =
                vec![("id".into(), 1.into()), ("cmd".into(), "PING".into())];
            m.extend((0..members).map(|i| (format!("x{i}").into(), 0.into())));
            assert!(
                request(&map(m.clone())).is_ok(),
                "{members} distinct members"
            );
            m.push(("cmd".into(), "PING".into()));
            assert!(
                request(&map(m)).is_err(),
                "a known key repeated after {members}"
            );
        }
    }

    #[test]
    fn deep_nesting_in_an_unknown_member_is_refused_not_recursed() {
        let mut body = map(vec![("id".into(), 1.into()), ("cmd".into(), "PING".into())]);
        body[0] = 0x83;
        body.extend_from_slice(&[0xa4, b'd', b'e', b'e', b'p']);
        body.extend(std::iter::repeat_n(0x91, 100_000));
        body.push(0xc0);
        assert!(request(&body).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A fixed-seed generator, so a failure can be reproduced.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = map(vec![
            ("id".into(), 7.into()),
            ("cmd".into(), "SET".into()),
            (
                "args".into(),
                rmpv::Value::Map(vec![
                    ("key".into(), "k".into()),
                    ("value".into(), rmpv::Value::Binary(vec![1, 2])),
                ]),
            ),
        ]);
        for round in 0..20_000 {
            let mut body = if round % 2 == 0 {
                valid.clone()
            } else {
                Vec::new()
            };
            let len = (next() % 64) as usize;
            if body.is_empty() {
                body.extend((0..len).map(|_| next() as u8));
            } else {
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % body.len();
                    body[at] = next() as u8;
                }
            }
            let _ = request(&body);
            let _ = id_of(&body);
        }
    }
}
