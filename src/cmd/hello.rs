//! HELLO: the first request on every connection; agrees the protocol version, and on a listener that
//! needs one, checks the peer's token and so decides what it may reach.

use std::sync::Arc;

use scaled_client::answers::Welcome;
use scaled_client::proto::{
    Args, ErrorCode, MAX_CLIENT_NAME_LEN, MAX_FRAME_LEN, MAX_KEY_LEN, MAX_VALUE_LEN,
    PROTOCOL_VERSION,
};

use super::{CommandError, CommandResult, Peer, Reply};
use crate::access::{Origin, Scope};
use crate::daemon::Daemon;

pub fn run(daemon: &Arc<Daemon>, peer: &mut Peer, args: Args) -> CommandResult {
    let version = args
        .version
        .ok_or_else(|| CommandError::new(ErrorCode::BadArgument, "missing argument `version`"))?;
    if version != PROTOCOL_VERSION {
        return Err(CommandError::new(
            ErrorCode::UnsupportedVersion,
            format!("this daemon speaks protocol version {PROTOCOL_VERSION}, not {version}"),
        ));
    }
    let name = args.client.unwrap_or_default();
    // The name is the owner shown on every lock this connection holds: keep it small.
    if name.len() > MAX_CLIENT_NAME_LEN {
        return Err(CommandError::new(
            ErrorCode::TooLarge,
            format!(
                "client name of {} bytes is over the {MAX_CLIENT_NAME_LEN} byte limit",
                name.len()
            ),
        ));
    }
    if peer.origin == Origin::Tcp {
        let scope = daemon.access.authenticate(args.token.as_deref());
        // A later HELLO must show a token of the same scope: a connection's keys and locks never
        // move from one namespace to another.
        let scope = scope.and_then(|scope| {
            if peer.greeted && scope != peer.scope {
                Err("a connection keeps the scope of its first HELLO".to_string())
            } else {
                Ok(scope)
            }
        });
        match scope {
            Ok(scope) => peer.scope = scope,
            Err(why) => {
                peer.denied = true;
                return Err(CommandError::new(
                    ErrorCode::Denied,
                    format!("{why}; closing"),
                ));
            }
        }
    }
    let namespace = peer.scope.namespace();
    tracing::debug!(
        conn = peer.conn_id,
        client = %name,
        namespace = namespace.map_or("", |ns| ns.name()),
        "hello"
    );
    peer.owner = Arc::from(format!("{name}#{}", peer.conn_id));
    peer.greeted = true;
    let max_key = match &peer.scope {
        Scope::Unrestricted => MAX_KEY_LEN,
        Scope::Namespace(ns) => ns.max_key(),
    };
    Reply::encode(&Welcome {
        version: PROTOCOL_VERSION,
        server: concat!("scaled ", env!("CARGO_PKG_VERSION")).to_string(),
        max_frame: MAX_FRAME_LEN as u64,
        max_key: max_key as u64,
        max_value: MAX_VALUE_LEN as u64,
    })
}
