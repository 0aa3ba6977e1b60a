//! The Redis reference: just enough RESP to drive `redis-server` with the same client, at the same
//! cost per request, as scaled (`--resp`). Requests are built with [`crate::wire::Template::resp`];
//! this module splits and checks the replies.

use bytes::BytesMut;

use crate::wire::Expect;

/// Redis's compare-and-delete: delete the key only if it still holds this owner's token.
pub const UNLOCK_SCRIPT: &str =
    "if redis.call('get',KEYS[1])==ARGV[1] then return redis.call('del',KEYS[1]) else return 0 end";

/// Takes one whole RESP reply (simple string, error, integer or bulk string) off the front of `buf`.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line_end = eol + 2;
    let total = match buf[0] {
        b'+' | b'-' | b':' => line_end,
        b'$' => {
            let len: i64 = std::str::from_utf8(&buf[1..eol])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or("bad bulk length")?;
            match usize::try_from(len) {
                Ok(len) => line_end + len + 2,
                Err(_) => line_end,
            }
        }
        other => return Err(format!("unexpected RESP reply type {:?}", other as char)),
    };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// Checks one reply: a bulk string of the expected length, or the expected simple string.
pub fn check(reply: &[u8], expect: Expect) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(reply).trim_end().to_string();
    match expect {
        Expect::Bin(len) => {
            if reply.starts_with(b"$-1\r\n") {
                return Err("GET missed (nil)".into());
            }
            if !reply.starts_with(format!("${len}\r\n").as_bytes()) {
                return Err(format!(
                    "reply {}, expected a {len}-byte bulk string",
                    shown()
                ));
            }
            Ok(())
        }
        Expect::Text(want) => match reply.strip_prefix(b"+") {
            Some(rest) if rest.strip_suffix(b"\r\n") == Some(want.as_bytes()) => Ok(()),
            _ => Err(format!("reply {}, expected +{want}", shown())),
        },
    }
}

/// Checks that a reply is exactly `want` (`+OK\r\n`, `:1\r\n`).
pub fn check_exact(reply: &[u8], want: &[u8]) -> Result<(), String> {
    if reply == want {
        Ok(())
    } else {
        Err(format!(
            "reply {}, expected {}",
            String::from_utf8_lossy(reply).trim_end(),
            String::from_utf8_lossy(want).trim_end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_at_their_ends() {
        let mut buf = BytesMut::from(&b"+OK\r\n$3\r\nabc\r\n$-1\r\n:1\r\n$2\r\nx"[..]);
        assert_eq!(
            take_reply(&mut buf).unwrap().as_deref(),
            Some(&b"+OK\r\n"[..])
        );
        let bulk = take_reply(&mut buf).unwrap().expect("whole bulk");
        assert!(check(&bulk, Expect::Bin(3)).is_ok());
        let nil = take_reply(&mut buf).unwrap().expect("nil");
        assert!(check(&nil, Expect::Bin(3)).is_err());
        assert_eq!(
            take_reply(&mut buf).unwrap().as_deref(),
            Some(&b":1\r\n"[..])
        );
        assert!(take_reply(&mut buf).unwrap().is_none(), "bulk cut short");
    }
}
