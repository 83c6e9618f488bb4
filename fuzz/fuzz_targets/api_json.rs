//! tether's own JSON messages: the bodies the broker reads (enrollment,
//! renewal, token creation), the admin API's query strings (route filter,
//! trace), and the answers the agent and the operator CLI read back.
//!
//! Input: the first byte picks the message type. Properties: no panic; a
//! message that parses serializes, and (for types without floating-point
//! fields) parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_proto::api::{
    ApiError, EnrollRequest, EnrollResponse, GatewayInfo, PolicyInfo, RenewRequest, RenewResponse,
    RevokeResponse, RouteFilter, SessionInfo, SiteInfo, TokenRequest, TokenResponse, Trace,
    TraceQuery,
};

/// Parses `body`; a value that parses serializes and parses back equal.
fn json_round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(body: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(body) {
        let text = serde_json::to_vec(&v).expect("a parsed message serializes");
        let back: T = serde_json::from_slice(&text).expect("a serialized message parses");
        assert_eq!(back, v);
    }
}

/// Parses `body`; a value that parses serializes (floats may not round
/// trip exactly through text).
fn json_parse<T: DeserializeOwned + Serialize>(body: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(body) {
        let _ = serde_json::to_vec(&v).expect("a parsed message serializes");
    }
}

/// Parses a query string; a value that parses serializes and parses back.
fn query_round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(query: &[u8]) {
    if let Ok(v) = serde_urlencoded::from_bytes::<T>(query) {
        let text = serde_urlencoded::to_string(&v).expect("a parsed query serializes");
        let back: T = serde_urlencoded::from_str(&text).expect("a serialized query parses");
        assert_eq!(back, v);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 16 {
        0 => json_round_trip::<EnrollRequest>(body),
        1 => json_round_trip::<RenewRequest>(body),
        2 => json_round_trip::<TokenRequest>(body),
        3 => query_round_trip::<RouteFilter>(body),
        4 => query_round_trip::<TraceQuery>(body),
        5 => json_round_trip::<EnrollResponse>(body),
        6 => json_round_trip::<RenewResponse>(body),
        7 => json_round_trip::<ApiError>(body),
        8 => json_round_trip::<TokenResponse>(body),
        9 => json_parse::<Vec<SiteInfo>>(body),
        10 => json_parse::<Vec<SessionInfo>>(body),
        11 => json_parse::<Vec<GatewayInfo>>(body),
        12 => json_round_trip::<RevokeResponse>(body),
        13 => json_parse::<Trace>(body),
        14 => json_round_trip::<PolicyInfo>(body),
        _ => json_round_trip::<RouteFilter>(body),
    }
});
