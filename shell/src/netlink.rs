//! Route changes over netlink, many to a message.
//!
//! netlink-proto's connection sends one queued request each time its task
//! runs, so routes added as separate requests reach the kernel one after
//! another, each after the answer to the one before and a turn of the
//! runtime in between. [`apply`] sends the changes as batches instead: the
//! kernel applies a batch's messages in order and acknowledges each, so a
//! batch costs one wait for the kernel.

use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::sys::SocketAddr;

/// A netlink route connection whose requests see every acknowledgement.
pub type RouteHandle = rtnetlink::proto::ConnectionHandle<RouteNetlinkMessage>;

/// Changes sent to the kernel in one batch. The kernel queues all of a
/// batch's acknowledgements before any is read, about 830 bytes each in
/// the socket's receive buffer (208 KiB by default): 64 take a quarter of
/// it, where more than 256 would not fit and the rest would be lost.
pub const BATCH: usize = 64;

/// The longest wait for the kernel's answers to one batch.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One change to a routing table.
#[derive(Debug, Clone)]
pub enum RouteChange {
    /// Add the route, or replace one with the same key.
    Add(RouteMessage),
    /// Remove the route.
    Remove(RouteMessage),
}

/// Opens a netlink route connection (its task spawned on the current
/// runtime) that forwards every acknowledgement to its request, as
/// [`apply`] needs.
pub fn connect() -> io::Result<RouteHandle> {
    let (mut conn, handle, _) =
        rtnetlink::proto::new_connection(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
    conn.set_forward_ack(true);
    tokio::spawn(conn);
    Ok(handle)
}

/// Applies `changes` in order, in batches of [`BATCH`]; returns each
/// change's outcome, in the same order: the kernel's refusal, or
/// `TimedOut` for a change it did not answer within [`ANSWER_TIMEOUT`] of
/// its batch (and for every later one), or `BrokenPipe` when the
/// connection is closed.
pub async fn apply(handle: &RouteHandle, changes: &[RouteChange]) -> Vec<io::Result<()>> {
    let mut outcomes = Vec::with_capacity(changes.len());
    for chunk in changes.chunks(BATCH) {
        let requests = chunk.iter().map(|change| {
            let (message, flags) = match change {
                RouteChange::Add(m) => (
                    RouteNetlinkMessage::NewRoute(m.clone()),
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE,
                ),
                RouteChange::Remove(m) => (
                    RouteNetlinkMessage::DelRoute(m.clone()),
                    NLM_F_REQUEST | NLM_F_ACK,
                ),
            };
            let mut request = NetlinkMessage::from(message);
            request.header.flags = flags;
            request
        });
        let Ok(mut answers) = handle.request_batch(requests, SocketAddr::new(0, 0)) else {
            let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "netlink is closed");
            outcomes.extend((outcomes.len()..changes.len()).map(|_| Err(closed())));
            return outcomes;
        };
        // One acknowledgement per message, in the order sent.
        let before = outcomes.len();
        let read = async {
            while let Some(answer) = answers.next().await {
                if let NetlinkPayload::Error(e) = answer.payload {
                    outcomes.push(if e.code.is_some() {
                        Err(e.to_io())
                    } else {
                        Ok(())
                    });
                }
            }
        };
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, read).await;
        if outcomes.len() < before + chunk.len() {
            let silent = || io::Error::new(io::ErrorKind::TimedOut, "netlink did not answer");
            outcomes.extend((outcomes.len()..changes.len()).map(|_| Err(silent())));
            return outcomes;
        }
        // (More answers than messages would be the kernel's error.)
        outcomes.truncate(before + chunk.len());
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rtnetlink::RouteMessageBuilder;

    use super::*;
    use crate::netns;

    fn v4(index: u32, addr: Ipv4Addr, len: u8) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, len)
            .output_interface(index)
            .build()
    }

    fn v6(index: u32, addr: Ipv6Addr, len: u8) -> RouteMessage {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(addr, len)
            .output_interface(index)
            .build()
    }

    /// More changes than a batch carries all reach the kernel, each with
    /// its own outcome in order: a removal of a route that is not there
    /// and additions through a device that is down are refused at their
    /// own places, the others applied. In a network namespace of the
    /// test's thread; needs root.
    #[test]
    fn changes_in_several_batches_each_get_their_own_outcome() {
        netns::run(|| async {
            let device = netns::tun_device("tt-batch0");
            let index = device.if_index().unwrap();
            let handle = connect().unwrap();
            let hosts = |n: u32| (0..n).map(move |i| Ipv4Addr::from(0x0a32_0000 + i));
            let mut changes: Vec<RouteChange> = hosts(300)
                .map(|a| RouteChange::Add(v4(index, a, 32)))
                .collect();
            changes.push(RouteChange::Add(v6(index, "fd60::".parse().unwrap(), 64)));
            let outcomes = apply(&handle, &changes).await;
            assert_eq!(outcomes.len(), 301);
            assert!(outcomes.iter().all(Result::is_ok));
            assert_eq!(netns::routes(&["dev", "tt-batch0"]).len(), 301);

            // Half removed, and one that was never there.
            let mut changes: Vec<RouteChange> = hosts(150)
                .map(|a| RouteChange::Remove(v4(index, a, 32)))
                .collect();
            changes.insert(
                70,
                RouteChange::Remove(v4(index, Ipv4Addr::new(10, 99, 0, 0), 16)),
            );
            let outcomes = apply(&handle, &changes).await;
            assert_eq!(outcomes.len(), 151);
            for (i, outcome) in outcomes.iter().enumerate() {
                assert_eq!(outcome.is_err(), i == 70, "change {i}: {outcome:?}");
            }
            assert_eq!(netns::routes(&["dev", "tt-batch0"]).len(), 151);

            // A device that is down takes no IPv4 route.
            netns::ip(&["link", "set", "tt-batch0", "down"]);
            let changes = [
                RouteChange::Add(v4(index, Ipv4Addr::new(10, 40, 0, 0), 16)),
                RouteChange::Add(v4(index, Ipv4Addr::new(10, 41, 0, 0), 16)),
            ];
            let outcomes = apply(&handle, &changes).await;
            assert_eq!(outcomes.len(), 2);
            for outcome in &outcomes {
                let e = outcome.as_ref().unwrap_err();
                assert_eq!(e.raw_os_error(), Some(nix::libc::ENETDOWN), "{e}");
            }
        });
    }
}
