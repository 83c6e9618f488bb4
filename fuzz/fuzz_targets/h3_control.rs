//! HTTP/3's connection-level state: the peer's unidirectional streams
//! (control stream with SETTINGS and GOAWAY, QPACK streams, push and
//! unknown stream types), bytes arriving on several streams interleaved.
//!
//! Input: the first byte picks the role; then records of (stream, length,
//! bytes). Property: no panic; once the connection reports an error the
//! session is over (the shell closes it), so the target stops there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::h3::{Connection, Role, Settings};

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let role = if first & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    // Unidirectional streams the peer opens: client-initiated ones are
    // 2 mod 4, server-initiated ones 3 mod 4.
    let base = match role {
        Role::Server => 2,
        Role::Client => 3,
    };
    let mut conn = Connection::new(role, Settings::default());
    while let [stream, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        let stream_id = base + 4 * u64::from(stream % 8);
        if conn.on_uni_data(stream_id, bytes).is_err() {
            return;
        }
    }
});
