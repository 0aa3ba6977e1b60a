//! The scaled protocol as the load generator speaks it: requests written straight into the output
//! buffer (or from a template encoded once and patched per use), and answers read field by field
//! without building a value tree, so the generator spends its time on the socket, not on MessagePack.
//!
//! Every answer is read through [`Envelope::parse`], which checks the parts every answer must have:
//! an `id`, a well-formed `request_id`, and exactly one of `ok` or `err`.

use scaled_client::frame::{begin_frame, finish_frame, push_frame};
use scaled_client::proto::{Args, CommandName, Request};

/// Length of an owner token and of a request id: a hyphenated UUID.
pub const UUID_LEN: usize = 36;

/// Stands for the owner token in a template; patched per request.
pub const TOKEN_SLOT: &[u8; UUID_LEN] = b"TTTTTTTT-TTTT-TTTT-TTTT-TTTTTTTTTTTT";

/// Where the id's eight bytes sit in a template frame: 4-byte prefix, map header, fixstr "id", u64 marker.
const ID_AT: usize = 4 + 1 + 3 + 1;

/// Deepest nesting [`skip_value`] follows; the daemon's answers are at most three levels deep.
const MAX_DEPTH: usize = 32;

/// One request, encoded once, as a whole frame whose id, owner token and key digits are patched per use.
pub struct Template {
    /// The whole frame, prefix included.
    frame: Vec<u8>,
    /// False for RESP commands, which carry no id.
    has_id: bool,
    /// Where the owner token's bytes sit, for a request that carries one.
    token_at: Option<usize>,
    /// Where a key's fixed-width digits sit, for a template shared by a whole keyspace.
    digits_at: Option<usize>,
}

impl Template {
    /// A scaled request. Its id is written as a fixed 8-byte integer so that any id fits in place.
    pub fn new(mut request: Request) -> Template {
        request.id = u64::MAX;
        let mut frame = Vec::new();
        push_frame(&mut frame, &request.to_msgpack());
        debug_assert_eq!(&frame[4 + 1..ID_AT], &[0xa2, b'i', b'd', 0xcf]);
        Template {
            frame,
            has_id: true,
            token_at: None,
            digits_at: None,
        }
    }

    /// A RESP command: an array of bulk strings.
    pub fn resp(words: &[&[u8]]) -> Template {
        let mut frame = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            frame.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
            frame.extend_from_slice(word);
            frame.extend_from_slice(b"\r\n");
        }
        Template {
            frame,
            has_id: false,
            token_at: None,
            digits_at: None,
        }
    }

    /// Marks where [`TOKEN_SLOT`] sits, so [`Template::push_token`] can patch it.
    pub fn with_token_slot(mut self) -> Template {
        self.token_at = find(&self.frame, TOKEN_SLOT);
        debug_assert!(self.token_at.is_some(), "template must hold the token slot");
        self
    }

    /// Marks where the digits of [`key`]`(0)` sit, so [`Template::push_key`] can patch in any key.
    pub fn with_key_slot(mut self) -> Template {
        self.digits_at = find(&self.frame, key(0).as_bytes()).map(|at| at + KEY_PREFIX.len());
        debug_assert!(self.digits_at.is_some(), "template must hold key 0");
        self
    }

    /// Appends the request with this id.
    pub fn push(&self, out: &mut Vec<u8>, id: u64) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        if self.has_id {
            out[start + ID_AT..start + ID_AT + 8].copy_from_slice(&id.to_be_bytes());
        }
    }

    /// Appends the request with this owner token in its token slot.
    pub fn push_token(&self, out: &mut Vec<u8>, id: u64, token: &[u8; UUID_LEN]) {
        let start = out.len();
        self.push(out, id);
        if let Some(at) = self.token_at {
            out[start + at..start + at + UUID_LEN].copy_from_slice(token);
        }
    }

    /// Appends the request for key number `i` of the keyspace.
    pub fn push_key(&self, out: &mut Vec<u8>, id: u64, i: u64) {
        let start = out.len();
        self.push(out, id);
        if let Some(at) = self.digits_at {
            write_digits(&mut out[start + at..start + at + KEY_DIGITS], i);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What every key of the get/set keyspace starts with.
const KEY_PREFIX: &str = "key:";

/// Digits of a keyspace key: fixed width, so one template serves every key.
const KEY_DIGITS: usize = 12;

/// Key number `i` of the get/set keyspace, as redis-benchmark names them (`key:000000000042`).
pub fn key(i: u64) -> String {
    format!("{KEY_PREFIX}{i:012}")
}

fn write_digits(slot: &mut [u8], mut n: u64) {
    for b in slot.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// A request with these arguments and no context.
pub fn request(cmd: CommandName, args: Args) -> Request {
    Request {
        args,
        ..Request::new(0, cmd)
    }
}

/// One argument of a request written by [`write_request`].
pub enum Arg<'a> {
    /// A str (key, token).
    Str(&'a str),
    /// A bin (a cache value).
    Bin(&'a [u8]),
    /// An unsigned integer (ttl_ms, wait_ms).
    Uint(u64),
    /// A fence: `{lock, token}`.
    Fence(&'a str, u64),
}

/// Appends one request frame, encoded in place: the session workload's requests change with every
/// message (a new value, a new owner token), so they are written directly rather than patched.
pub fn write_request(
    out: &mut Vec<u8>,
    id: u64,
    cmd: CommandName,
    args: &[(&str, Arg<'_>)],
    session_id: &str,
    user_id: &str,
) {
    // Writing into a Vec cannot fail, so the results of the rmp calls are ignored.
    let start = begin_frame(out);
    let _ = rmp::encode::write_map_len(out, 5);
    let _ = rmp::encode::write_str(out, "id");
    let _ = rmp::encode::write_uint(out, id);
    let _ = rmp::encode::write_str(out, "cmd");
    let _ = rmp::encode::write_str(out, cmd.as_str());
    let _ = rmp::encode::write_str(out, "args");
    let _ = rmp::encode::write_map_len(out, args.len() as u32);
    for (name, value) in args {
        let _ = rmp::encode::write_str(out, name);
        match value {
            Arg::Str(s) => {
                let _ = rmp::encode::write_str(out, s);
            }
            Arg::Bin(b) => {
                let _ = rmp::encode::write_bin(out, b);
            }
            Arg::Uint(n) => {
                let _ = rmp::encode::write_uint(out, *n);
            }
            Arg::Fence(lock, token) => {
                let _ = rmp::encode::write_map_len(out, 2);
                let _ = rmp::encode::write_str(out, "lock");
                let _ = rmp::encode::write_str(out, lock);
                let _ = rmp::encode::write_str(out, "token");
                let _ = rmp::encode::write_uint(out, *token);
            }
        }
    }
    let _ = rmp::encode::write_str(out, "session_id");
    let _ = rmp::encode::write_str(out, session_id);
    let _ = rmp::encode::write_str(out, "user_id");
    let _ = rmp::encode::write_str(out, user_id);
    finish_frame(out, start);
}

/// One answer, read without copying: the envelope's members and the raw bytes of `ok`.
pub struct Envelope<'a> {
    /// The id the answer carries.
    pub id: u64,
    /// The daemon's request id: 36 characters, checked to be a hyphenated UUID.
    pub request_id: &'a [u8; UUID_LEN],
    /// The daemon's time on the request.
    pub elapsed_us: u64,
    /// The `ok` value's MessagePack bytes, or the error's code and message.
    pub result: Result<&'a [u8], (String, String)>,
}

impl<'a> Envelope<'a> {
    /// Reads one response body. Anything that is not a well-formed answer is an error: the stream
    /// can no longer be trusted to belong to this client's requests.
    pub fn parse(body: &'a [u8]) -> Result<Envelope<'a>, String> {
        let mut rd = body;
        let fields = rmp::decode::read_map_len(&mut rd).map_err(|e| format!("not a map: {e}"))?;
        let (mut id, mut request_id, mut elapsed_us, mut result) = (None, None, None, None);
        for _ in 0..fields {
            let name = read_str(&mut rd).map_err(|e| format!("bad field name: {e}"))?;
            match name {
                "id" => id = Some(read_uint(&mut rd)?),
                "elapsed_us" => elapsed_us = Some(read_uint(&mut rd)?),
                "request_id" => {
                    let text = read_str(&mut rd)?;
                    request_id =
                        Some(uuid_text(text).ok_or_else(|| {
                            format!("request_id {text:?} is not a hyphenated UUID")
                        })?);
                }
                "ok" => {
                    let before = rd;
                    skip_value(&mut rd, 0)?;
                    result = Some(Ok(&before[..before.len() - rd.len()]));
                }
                "err" => result = Some(Err(read_error(&mut rd)?)),
                _ => skip_value(&mut rd, 0)?,
            }
        }
        if !rd.is_empty() {
            return Err(format!("{} bytes after the answer", rd.len()));
        }
        match (id, request_id, elapsed_us, result) {
            (Some(id), Some(request_id), Some(elapsed_us), Some(result)) => Ok(Envelope {
                id,
                request_id,
                elapsed_us,
                result,
            }),
            _ => Err("answer without id, request_id, elapsed_us, or ok/err".into()),
        }
    }

    /// The `ok` value, or the error as one line.
    pub fn ok(&self) -> Result<&'a [u8], String> {
        self.result
            .clone()
            .map_err(|(code, message)| format!("{code}: {message}"))
    }

    /// The error code, when the answer is an error.
    pub fn err_code(&self) -> Option<&str> {
        self.result.as_ref().err().map(|(code, _)| code.as_str())
    }
}

/// The bytes of a hyphenated UUID (8-4-4-4-12 hex digits), or `None`.
fn uuid_text(text: &str) -> Option<&[u8; UUID_LEN]> {
    let bytes: &[u8; UUID_LEN] = text.as_bytes().try_into().ok()?;
    let well_formed = bytes.iter().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => *b == b'-',
        _ => b.is_ascii_hexdigit(),
    });
    well_formed.then_some(bytes)
}

/// Reads `err: {code, message}`.
fn read_error(rd: &mut &[u8]) -> Result<(String, String), String> {
    let fields = rmp::decode::read_map_len(rd).map_err(|e| format!("err is not a map: {e}"))?;
    let (mut code, mut message) = (String::new(), String::new());
    for _ in 0..fields {
        match read_str(rd)? {
            "code" => code = read_str(rd)?.to_string(),
            "message" => message = read_str(rd)?.to_string(),
            _ => skip_value(rd, 0)?,
        }
    }
    Ok((code, message))
}

/// What a successful answer must hold.
#[derive(Clone, Copy)]
pub enum Expect {
    /// A bin of this length (GET hit).
    Bin(usize),
    /// This str (SET's "OK", PING's "PONG").
    Text(&'static str),
}

/// Checks one answer: the id sent, no `err`, and an `ok` of the expected shape.
pub fn check(body: &[u8], id: u64, expect: Expect) -> Result<(), String> {
    let mut ok = answer_to(body, id)?;
    match expect {
        Expect::Bin(len) => match read_bin(&mut ok)? {
            None => Err("GET missed (ok: nil)".into()),
            Some(v) if v.len() != len => Err(format!("value of {} bytes, expected {len}", v.len())),
            Some(_) => Ok(()),
        },
        Expect::Text(want) => match read_str(&mut ok)? {
            got if got == want => Ok(()),
            got => Err(format!("ok is {got:?}, expected {want:?}")),
        },
    }
}

/// The `ok` bytes of an answer that must carry `id` and must not be an error.
pub fn answer_to(body: &[u8], id: u64) -> Result<&[u8], String> {
    let envelope = Envelope::parse(body)?;
    if envelope.id != id {
        return Err(format!("response id {}, expected {id}", envelope.id));
    }
    envelope.ok()
}

/// What a LOCK granted.
pub struct Grant {
    /// The owner token UNLOCK must carry.
    pub token: [u8; UUID_LEN],
    /// The fencing token of this grant.
    pub fence: u64,
    /// The lease granted, in milliseconds.
    pub ttl_ms: u64,
    /// How long the LOCK waited in the queue; 0 when the lock was free.
    pub waited_us: u64,
}

/// Reads LOCK's answer `{token, fence, ttl_ms, waited_us}`.
pub fn read_grant(mut rd: &[u8]) -> Result<Grant, String> {
    let rd = &mut rd;
    let fields = rmp::decode::read_map_len(rd).map_err(|e| format!("grant is not a map: {e}"))?;
    let (mut token, mut fence, mut ttl_ms, mut waited_us) = (None, None, None, None);
    for _ in 0..fields {
        match read_str(rd)? {
            "token" => {
                let t = read_str(rd)?;
                token = Some(
                    <[u8; UUID_LEN]>::try_from(t.as_bytes())
                        .map_err(|_| format!("owner token {t:?} is not {UUID_LEN} characters"))?,
                );
            }
            "fence" => fence = Some(read_uint(rd)?),
            "ttl_ms" => ttl_ms = Some(read_uint(rd)?),
            "waited_us" => waited_us = Some(read_uint(rd)?),
            _ => skip_value(rd, 0)?,
        }
    }
    match (token, fence, ttl_ms, waited_us) {
        (Some(token), Some(fence), Some(ttl_ms), Some(waited_us)) => Ok(Grant {
            token,
            fence,
            ttl_ms,
            waited_us,
        }),
        _ => Err("grant without token, fence, ttl_ms or waited_us".into()),
    }
}

/// Reads UNLOCK's answer `{status}` and checks that the status is OK.
pub fn read_unlock_status(mut rd: &[u8]) -> Result<(), String> {
    let rd = &mut rd;
    let fields = rmp::decode::read_map_len(rd).map_err(|e| format!("status is not a map: {e}"))?;
    let mut ok = false;
    for _ in 0..fields {
        match read_str(rd)? {
            "status" => match read_str(rd)? {
                "OK" => ok = true,
                other => return Err(format!("UNLOCK answered status {other}, expected OK")),
            },
            _ => skip_value(rd, 0)?,
        }
    }
    if ok {
        Ok(())
    } else {
        Err("UNLOCK answer without a status".into())
    }
}

/// Reads a bin (a GET hit) or nil (a miss).
pub fn read_bin<'a>(rd: &mut &'a [u8]) -> Result<Option<&'a [u8]>, String> {
    if rd.first() == Some(&0xc0) {
        *rd = &rd[1..];
        return Ok(None);
    }
    let n = rmp::decode::read_bin_len(rd).map_err(|e| format!("ok is not a bin: {e}"))? as usize;
    if rd.len() < n {
        return Err(format!("bin of {n} bytes cut short"));
    }
    let (value, rest) = rd.split_at(n);
    *rd = rest;
    Ok(Some(value))
}

/// Reads a str.
pub fn read_str<'a>(rd: &mut &'a [u8]) -> Result<&'a str, String> {
    let (s, rest) = rmp::decode::read_str_from_slice(*rd).map_err(|e| format!("not a str: {e}"))?;
    *rd = rest;
    Ok(s)
}

/// Reads an unsigned integer of any width.
pub fn read_uint(rd: &mut &[u8]) -> Result<u64, String> {
    rmp::decode::read_int::<u64, _>(rd).map_err(|e| format!("bad integer: {e}"))
}

/// Steps over one MessagePack value of any kind without allocating.
pub fn skip_value(rd: &mut &[u8], depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("value nested too deep".into());
    }
    let (&marker, rest) = rd.split_first().ok_or("value cut short")?;
    *rd = rest;
    let be = |rd: &mut &[u8], n: usize| -> Result<usize, String> {
        if rd.len() < n {
            return Err("value cut short".into());
        }
        let (head, rest) = rd.split_at(n);
        *rd = rest;
        Ok(head.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize))
    };
    let (skip, items) = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        0x80..=0x8f => (0, 2 * (marker & 0x0f) as usize),
        0x90..=0x9f => (0, (marker & 0x0f) as usize),
        0xa0..=0xbf => ((marker & 0x1f) as usize, 0),
        0xcc | 0xd0 => (1, 0),
        0xcd | 0xd1 => (2, 0),
        0xce | 0xd2 | 0xca => (4, 0),
        0xcf | 0xd3 | 0xcb => (8, 0),
        0xc4 | 0xd9 => (be(rd, 1)?, 0),
        0xc5 | 0xda => (be(rd, 2)?, 0),
        0xc6 | 0xdb => (be(rd, 4)?, 0),
        0xdc => (0, be(rd, 2)?),
        0xdd => (0, be(rd, 4)?),
        0xde => (0, 2 * be(rd, 2)?),
        0xdf => (0, 2 * be(rd, 4)?),
        0xd4 => (2, 0),
        0xd5 => (3, 0),
        0xd6 => (5, 0),
        0xd7 => (9, 0),
        0xd8 => (17, 0),
        0xc7 => (be(rd, 1)? + 1, 0),
        0xc8 => (be(rd, 2)? + 1, 0),
        0xc9 => (be(rd, 4)? + 1, 0),
        other => return Err(format!("marker {other:#04x} is not MessagePack")),
    };
    if rd.len() < skip {
        return Err("value cut short".into());
    }
    *rd = &rd[skip..];
    for _ in 0..items {
        skip_value(rd, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_request_decodes_as_the_daemon_reads_it() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            7,
            CommandName::Set,
            &[
                ("key", Arg::Str("session:1")),
                ("value", Arg::Bin(b"state")),
                ("fence", Arg::Fence("session:1", 42)),
            ],
            "s1",
            "u1",
        );
        let request = scaled_client::decode_request(&out[4..]).expect("decodes");
        assert_eq!(request.id, 7);
        assert_eq!(request.cmd, CommandName::Set);
        assert_eq!(request.args.value.as_deref(), Some(&b"state"[..]));
        assert_eq!(request.args.fence.map(|f| f.token), Some(42));
        assert_eq!(request.user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn key_templates_patch_any_key() {
        let get = Template::new(request(
            CommandName::Get,
            Args {
                key: Some(key(0)),
                ..Args::default()
            },
        ))
        .with_key_slot();
        let mut out = Vec::new();
        get.push_key(&mut out, 3, 999_999);
        let request = scaled_client::decode_request(&out[4..]).expect("decodes");
        assert_eq!(request.args.key, Some(key(999_999)));
        assert_eq!(request.id, 3);
    }

    #[test]
    fn skip_value_steps_over_nested_values() {
        let value = rmpv::Value::Map(vec![(
            rmpv::Value::from("a"),
            rmpv::Value::Array(vec![rmpv::Value::from(1u64 << 40), rmpv::Value::from(-3)]),
        )]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).expect("encodes");
        bytes.push(0x01);
        let mut rd = &bytes[..];
        skip_value(&mut rd, 0).expect("skips");
        assert_eq!(rd, &[0x01]);
    }
}
