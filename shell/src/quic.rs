//! The QUIC transport settings of tunnels, the same at both ends.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn::{SendDatagramError, VarInt};

/// The UDP payload size of every tunnel packet (QUIC's "MTU"): fixed, so
/// the tunnel's MTU never changes under a running session. It carries
/// IPv6's minimum of 1280 bytes inside (RFC 9484, section 10.1) and fits
/// paths with an IP MTU of 1428 bytes (IPv4) or 1448 (IPv6) and up.
pub const TUNNEL_UDP_PAYLOAD: u16 = 1400;

/// The UDP payload size of a tunnel on a narrower path, one that loses
/// [`TUNNEL_UDP_PAYLOAD`]-byte packets but carries these (an IP MTU of
/// 1348 to 1427 bytes over IPv4: an IPsec VPN on the way, say): the
/// smallest that still carries IPv6's minimum of 1280 bytes inside. The
/// site chooses it for the connection from what the path has answered
/// (the broker follows the site's `max_udp_payload_size`); below it,
/// HTTP/3 cannot carry the packets a tunnel must and the site uses
/// HTTP/2.
pub const NARROW_UDP_PAYLOAD: u16 = 1320;

/// Bytes of datagrams a tunnel connection holds that arrived and were not
/// read yet; beyond this the oldest are dropped (counted by
/// [`DatagramReader`]).
///
/// In front of this queue is the UDP socket's buffer
/// ([`crate::udp::SOCKET_BUFFER`]), which holds what arrives while the
/// process is off the CPU. When it runs again, the connection decrypts
/// that backlog in one run, faster than the datagrams' reader routes them,
/// so the backlog lands in this queue at once. The queue therefore holds
/// at least what the socket buffer does: smaller, and a burst the kernel
/// kept through a stall is dropped one step later, here.
pub const DATAGRAM_RECEIVE_BUFFER: usize = receive_queue_bytes(crate::udp::SOCKET_BUFFER);

/// The receive queue a tunnel connection needs behind a UDP socket buffer
/// of `socket_buffer` bytes: as much, and never less than 4 MiB.
pub const fn receive_queue_bytes(socket_buffer: usize) -> usize {
    const FLOOR: usize = 4 << 20;
    if socket_buffer > FLOOR {
        socket_buffer
    } else {
        FLOOR
    }
}

/// Bytes of datagrams a tunnel connection holds waiting to be sent: about
/// 16 ms at 2 Gbit/s. A sender that can wait ([`send_datagram_within`])
/// waits for room when it is full; [`try_send_datagram`] reports it full.
pub const DATAGRAM_SEND_BUFFER: usize = 4 << 20;

/// The QUIC transport settings of both ends of a tunnel: the broker's
/// listener and the agent's (and test clients') connections.
pub fn transport_config(keepalive: Duration, idle_timeout: Duration) -> quinn::TransportConfig {
    transport_config_sized(keepalive, idle_timeout, TUNNEL_UDP_PAYLOAD)
}

/// As [`transport_config`], with packets of `udp_payload` bytes (a site's
/// connection over a narrow path: [`NARROW_UDP_PAYLOAD`]).
pub fn transport_config_sized(
    keepalive: Duration,
    idle_timeout: Duration,
    udp_payload: u16,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keepalive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // One packet size for the life of the connection. With path MTU
    // discovery on, quinn judges a "black hole" from loss bursts of
    // packets larger than its minimum; a tunnel's packets are all large, so
    // on a path with random loss (1 % is enough) it resets the MTU to 1200
    // bytes, every full-size packet then exceeds the datagram limit and the
    // tunnel stalls until discovery climbs again a minute later. With the
    // minimum at the tunnel's size there is nothing to fall back to.
    t.initial_mtu(udp_payload);
    t.min_mtu(udp_payload);
    t.mtu_discovery_config(None);
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    // quinn keeps an entry in each connection for every stream the peer
    // may open. HTTP/3 with CONNECT-IP needs few: the peer's control
    // stream (and QPACK's two: RFC 9114 section 6.2 asks to allow at least
    // 3 unidirectional), one request stream per tunnel and the site's
    // occasional requests (renewal, broker list, reports), which wait for
    // a stream when more are open at once.
    t.max_concurrent_uni_streams(VarInt::from_u32(4));
    t.max_concurrent_bidi_streams(VarInt::from_u32(8));
    // Ask the peer (if it supports the ACK frequency extension) to
    // acknowledge every 16th packet, or after 10 ms, instead of every 2nd:
    // a tunnel sends packets in long runs, and each acknowledgement is a
    // packet through every hop.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(15));
    ack.max_ack_delay(Some(Duration::from_millis(10)));
    t.ack_frequency_config(Some(ack));
    t.congestion_controller_factory(Arc::new(TunnelCongestion::default()));
    t
}

/// The application error code of a tunnel connection closed because its
/// path stopped carrying full-size packets.
pub const PATH_BLACK_HOLE_CODE: u32 = 0x101;

/// The reason sent with [`PATH_BLACK_HOLE_CODE`].
pub const PATH_BLACK_HOLE_REASON: &str = "the path stopped carrying full-size packets";

/// Resolves when the path under `conn` stops carrying full-size packets
/// while small ones still cross (see [`tether_proto::path_watch`]), after
/// closing the connection with [`PATH_BLACK_HOLE_CODE`] so the site dials
/// again over what the path carries. Pending while the path is healthy;
/// costs one look at the connection's statistics per window.
pub async fn path_black_hole(conn: &quinn::Connection) {
    use tether_proto::path_watch::{BlackHoleWatch, PathSample, WINDOW};
    let mut watch = BlackHoleWatch::new();
    let mut tick = tokio::time::interval(WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stats = conn.stats();
        let sample = PathSample {
            sent_bytes: stats.udp_tx.bytes,
            lost_bytes: stats.path.lost_bytes,
            lost_packets: stats.path.lost_packets,
        };
        if watch.observe(Instant::now(), sample) {
            conn.close(
                VarInt::from_u32(PATH_BLACK_HOLE_CODE),
                PATH_BLACK_HOLE_REASON.as_bytes(),
            );
            return;
        }
    }
}

/// Queues a datagram on a tunnel connection if its send queue has room:
/// `Ok(None)` when queued, `Ok(Some(data))` (the datagram handed back)
/// when the queue is full. Takes the connection's lock once.
pub fn try_send_datagram(
    conn: &quinn::Connection,
    data: Bytes,
) -> Result<Option<Bytes>, SendDatagramError> {
    use futures_util::FutureExt;
    // Polled once: ready when the datagram was queued (or refused), pending
    // only when the queue is full. A clone of `Bytes` is a reference count.
    match conn.send_datagram_wait(data.clone()).now_or_never() {
        Some(Ok(())) => Ok(None),
        Some(Err(e)) => Err(e),
        None => Ok(Some(data)),
    }
}

/// What became of a datagram given to [`send_datagram_within`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued, at once or after waiting for room.
    Queued,
    /// The queue stayed full for the whole wait: the datagram was dropped.
    Dropped,
}

/// Queues a datagram on a tunnel connection, waiting up to `patience` for
/// room in a full send queue instead of dropping: the sender slows down to
/// the connection's pace, and what it reads waits in the queues in front
/// of it (a device's queue in the kernel). After `patience` the datagram
/// is dropped.
pub async fn send_datagram_within(
    conn: &quinn::Connection,
    data: Bytes,
    patience: Duration,
) -> Result<Sent, SendDatagramError> {
    match tokio::time::timeout(patience, conn.send_datagram_wait(data)).await {
        Ok(Ok(())) => Ok(Sent::Queued),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(Sent::Dropped),
    }
}

/// Queues a datagram on a tunnel connection, as
/// [`quinn::Connection::send_datagram`] does; `Ok(true)` when the
/// connection's send queue was full and an older waiting datagram gave way
/// to it (quinn drops the oldest silently: this is how it is counted).
/// Takes the connection's lock once when the queue has room.
pub fn send_datagram(conn: &quinn::Connection, data: Bytes) -> Result<bool, SendDatagramError> {
    match try_send_datagram(conn, data)? {
        None => Ok(false),
        Some(data) => {
            conn.send_datagram(data)?;
            Ok(true)
        }
    }
}

/// Reads a tunnel connection's datagrams in batches, and counts those its
/// receive queue dropped.
///
/// quinn keeps datagrams that arrived and were not read yet in a queue of
/// [`DATAGRAM_RECEIVE_BUFFER`] bytes and drops the oldest, silently, when more
/// arrive. The drops are counted from the connection's statistics: once the
/// queue is found empty, every datagram received before it was looked at
/// was either read or dropped. The count is a lower bound (datagrams that
/// arrived in between and were read make it smaller) and never decreases.
pub struct DatagramReader {
    conn: quinn::Connection,
    read: u64,
    dropped: u64,
}

impl DatagramReader {
    /// A reader of `conn`'s datagrams.
    pub fn new(conn: quinn::Connection) -> Self {
        Self {
            conn,
            read: 0,
            dropped: 0,
        }
    }

    /// Waits for a datagram, then takes it and those waiting behind it, at
    /// most `max`, into `batch` (cleared first). Returns how many datagrams
    /// the receive queue dropped since the last call.
    pub async fn next_batch(
        &mut self,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<u64, quinn::ConnectionError> {
        use futures_util::FutureExt;
        batch.clear();
        batch.push(self.conn.read_datagram().await?);
        let mut dropped = 0;
        while batch.len() < max.max(1) {
            if let Some(Ok(d)) = self.conn.read_datagram().now_or_never() {
                batch.push(d);
                continue;
            }
            // The queue looked empty: settle the count against what the
            // connection had received before looking again.
            let received = self.conn.stats().frame_rx.datagram;
            match self.conn.read_datagram().now_or_never() {
                Some(Ok(d)) => batch.push(d),
                _ => {
                    let read = self.read + batch.len() as u64;
                    let lost = received.saturating_sub(read);
                    dropped = lost.saturating_sub(self.dropped);
                    self.dropped = self.dropped.max(lost);
                    break;
                }
            }
        }
        self.read += batch.len() as u64;
        Ok(dropped)
    }
}

/// Congestion control for a tunnel: BBR (quinn's), told only of
/// persistent congestion, not of every lost packet.
///
/// A tunnel carries traffic that has congestion control of its own (the
/// inner TCP or QUIC), and its datagrams are never retransmitted, so each
/// loss already reaches the inner sender. A loss-based outer controller
/// (Cubic, quinn's default) shrinks its window on every random loss of a
/// lossy uplink as well: at 1 % loss and 50 ms it held the tunnel to about
/// 3 Mbit/s where the same path without a tunnel carried 180, while
/// datagrams queued in front of it. BBR bounds what is in flight by about
/// twice its bandwidth estimate times the lowest RTT and paces at that
/// window over the RTT (quinn's estimate is the highest rate seen between
/// consecutive sends or ACKs, which batches and ACK bursts drive far above
/// the path's rate: on the lossy paths of BENCHMARKS.md the window did not
/// bind, and the inner traffic's own control set the rate); its loss recovery
/// (packet conservation while any loss is outstanding) is what collapses
/// it on random loss, so losses are not passed to it. Persistent
/// congestion (everything lost for several round trips: an outage or a
/// path change) still resets it.
#[derive(Debug, Clone, Default)]
pub struct TunnelCongestion {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for TunnelCongestion {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant(self.bbr.clone().build(now, current_mtu)))
    }
}

/// A controller that hears only of persistent congestion.
struct LossTolerant(Box<dyn Controller>);

impl Controller for LossTolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.0.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.0
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if is_persistent_congestion {
            self.0
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.0.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossTolerant(self.0.clone_box()))
    }

    fn initial_window(&self) -> u64 {
        self.0.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The async runtime of tunnel endpoints: quinn's tokio runtime, except
/// that a driver task (the endpoint's or a connection's) that asks to be
/// polled again from inside its own poll is polled again at once.
///
/// quinn's drivers end a poll that left work undone (a receive cycle that
/// used its time budget, a timer that expired while the connection was
/// busy) by waking themselves. In tokio's multi-threaded scheduler a task
/// woken from its own poll goes to the back of the queue and wakes an idle
/// worker thread to come and take it. On a lightly loaded broker that was
/// about two thread wake-ups per ping, each one a context switch on the
/// path of a packet (and on a busy machine a wait for a core). Polling
/// again in place ([`MAX_REPOLLS`] times at most, then yielding as before)
/// keeps the packet on the thread that already has it.
pub fn runtime() -> Option<Arc<dyn quinn::Runtime>> {
    Some(Arc::new(TunnelRuntime {
        inner: quinn::default_runtime()?,
    }))
}

/// How many times a driver that woke itself is polled again in place
/// before it yields to other tasks: the work quinn bounds per poll (a
/// receive cycle of about 50 µs, or a batch of transmits) at most doubles.
pub const MAX_REPOLLS: usize = 1;

/// See [`runtime`].
#[derive(Debug)]
struct TunnelRuntime {
    inner: Arc<dyn quinn::Runtime>,
}

impl quinn::Runtime for TunnelRuntime {
    fn new_timer(&self, i: Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        self.inner.new_timer(i)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.inner.spawn(Box::pin(RepollSelfWake::new(future)))
    }

    fn wrap_udp_socket(
        &self,
        t: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        Ok(Arc::new(BatchGatedSocket {
            inner: self.inner.wrap_udp_socket(t)?,
        }))
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }
}

/// How many datagrams a driver sends in one poll before its transmits may
/// be segmentation-offload batches ([`BatchGatedSocket`]). A handshake's
/// flight and an idle connection's keepalives and acknowledgements stay
/// below it; a connection with a backlog sends a pacing burst of at least
/// 10 at a time (quinn's smallest) and passes it at its first burst.
pub const BATCHING_AFTER: usize = 8;

std::thread_local! {
    /// The most segments a transmit of the driver being polled on this
    /// thread may have (no limit outside a driver's poll).
    static SEGMENTS_ALLOWED: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    /// Datagrams the driver being polled on this thread sent in this poll.
    static SENT_IN_POLL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The endpoint's UDP socket as quinn's drivers see it: a connection's
/// transmits are single datagrams until it has once sent
/// [`BATCHING_AFTER`] in one poll, and segmentation-offload batches (as
/// many segments as the socket takes) from then on.
///
/// quinn gives each connection a send buffer sized for the largest batch
/// the socket takes (10 datagrams of [`TUNNEL_UDP_PAYLOAD`], about 14 KiB)
/// the first time a transmit holds two datagrams (the handshake's flight
/// does), and keeps it for the connection's life: on a broker with
/// thousands of idle sites, the largest part of each idle connection's
/// memory. Batches only pay where there is a backlog to send, so a
/// connection earns them by having one; the rest keep a buffer of one
/// datagram. Which driver is sending is known from the thread: quinn's
/// drivers send only from their own poll, which [`RepollSelfWake`] wraps.
///
/// It also joins the batches a driver sends in one poll into fewer sends
/// ([`Joining`]).
#[derive(Debug)]
struct BatchGatedSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for BatchGatedSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let sent = JOINING.with(|j| j.borrow_mut().send(&self.inner, transmit));
        if sent.is_ok() {
            let datagrams = match transmit.segment_size {
                Some(s) if s > 0 => transmit.contents.len().div_ceil(s),
                _ => 1,
            };
            SENT_IN_POLL.with(|n| n.set(n.get().saturating_add(datagrams)));
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner
            .max_transmit_segments()
            .min(SEGMENTS_ALLOWED.with(|s| s.get()))
            .max(1)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The most datagrams quinn puts in one transmit (its
/// `MAX_TRANSMIT_SEGMENTS`, fixed in quinn and lower than the kernel's 64):
/// a transmit of this many full datagrams is one quinn ended at its limit,
/// and its next follows in the same poll unless the window or the pacer
/// stops it.
pub const QUINN_TRANSMIT_SEGMENTS: usize = 10;

/// The most bytes one joined send carries: the largest UDP payload of an
/// IPv4 packet (65,535 bytes less the IP and UDP headers), which one
/// segmentation-offload send must fit in.
pub const MAX_JOINED_BYTES: usize = 65_535 - 20 - 8;

std::thread_local! {
    /// The transmits held to be joined by the driver being polled on this
    /// thread ([`Joining`]).
    static JOINING: std::cell::RefCell<Joining> = std::cell::RefCell::new(Joining::default());
}

/// Joins the transmits of one driver's poll into fewer sends.
///
/// quinn builds a transmit of at most [`QUINN_TRANSMIT_SEGMENTS`]
/// datagrams, one `sendmsg` each, and a connection's driver sends two per
/// poll (four when [`RepollSelfWake`] polls it again in place); the kernel
/// takes up to 64 datagrams and 64 KiB in one segmentation-offload send.
/// The system call, and the routing and filtering of each packet on its
/// way out, are paid per send, not per datagram.
///
/// A transmit quinn filled to its limit is accepted and held. The
/// transmits that follow it in the same poll, to the same destination from
/// the same source, with the same ECN marking and datagram size, are
/// appended, and the whole leaves as one send when a transmit that is not
/// full ends it (quinn had no more), when another full one would not fit,
/// before a transmit that cannot join it, and at the latest when the
/// driver's poll ends. A transmit that is not full, with nothing held (a
/// lone packet, an acknowledgement, a handshake's flight), is sent at once
/// as before: only the batches of a backlog wait, and not past the poll
/// that made them.
///
/// quinn was told that the held transmits were sent, so a joined send that
/// finds the socket full (`WouldBlock`) is kept, never dropped (that would
/// be a loss): the driver is woken when the socket is writable and sends it
/// before anything else ([`RepollSelfWake`]). Until then the driver's new
/// transmits are refused with `WouldBlock`, and quinn keeps and retries
/// them itself, as with any full socket. Any other error loses the joined
/// datagrams, as it loses a transmit sent alone (quinn-udp reports such
/// errors as sent).
#[derive(Default)]
struct Joining {
    /// A driver is being polled on this thread: transmits may be held.
    active: bool,
    held: Option<Joined>,
    /// The buffer of the last joined send, kept for the next one.
    spare: Vec<u8>,
}

/// Transmits held to leave as one send ([`Joining`]).
struct Joined {
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    destination: std::net::SocketAddr,
    ecn: Option<quinn::udp::EcnCodepoint>,
    src_ip: Option<std::net::IpAddr>,
    segment_size: usize,
    contents: Vec<u8>,
}

/// The datagrams of a transmit.
fn datagrams(t: &quinn::udp::Transmit) -> usize {
    match t.segment_size {
        Some(s) if s > 0 => t.contents.len().div_ceil(s),
        _ => 1,
    }
}

/// The datagram size of a transmit quinn filled to its limit
/// ([`QUINN_TRANSMIT_SEGMENTS`] datagrams of one size), if `t` is one.
fn full_transmit(t: &quinn::udp::Transmit) -> Option<usize> {
    t.segment_size
        .filter(|&s| s > 0 && t.contents.len() == s * QUINN_TRANSMIT_SEGMENTS)
}

/// Whether two sockets are the same (their data, whatever the vtable).
fn same_socket(a: &Arc<dyn quinn::AsyncUdpSocket>, b: &Arc<dyn quinn::AsyncUdpSocket>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Joined {
    fn datagrams(&self) -> usize {
        self.contents.len().div_ceil(self.segment_size)
    }

    /// Whether the last held datagram is full, so that more may follow.
    fn ends_full(&self) -> bool {
        self.contents.len().is_multiple_of(self.segment_size)
    }

    /// Whether `t` may be appended: sent on the same socket to the same
    /// destination, from the same source, with the same marking; its
    /// datagrams of the held ones' size (its last, or only, one may be
    /// shorter); the whole within the socket's and the kernel's limits.
    fn takes(&self, socket: &Arc<dyn quinn::AsyncUdpSocket>, t: &quinn::udp::Transmit) -> bool {
        let size_fits = match t.segment_size {
            Some(s) if s < t.contents.len() => s == self.segment_size,
            _ => t.contents.len() <= self.segment_size,
        };
        same_socket(&self.socket, socket)
            && self.destination == t.destination
            && self.src_ip == t.src_ip
            && self.ecn == t.ecn
            && self.ends_full()
            && size_fits
            && !t.contents.is_empty()
            && self.contents.len() + t.contents.len() <= MAX_JOINED_BYTES
            && self.datagrams() + datagrams(t) <= socket.max_transmit_segments()
    }

    /// Whether another full transmit could still be appended.
    fn has_room(&self) -> bool {
        self.ends_full()
            && self.contents.len() + self.segment_size * QUINN_TRANSMIT_SEGMENTS <= MAX_JOINED_BYTES
            && self.datagrams() + QUINN_TRANSMIT_SEGMENTS <= self.socket.max_transmit_segments()
    }

    fn send(&self) -> std::io::Result<()> {
        self.socket.try_send(&quinn::udp::Transmit {
            destination: self.destination,
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: (self.datagrams() > 1).then_some(self.segment_size),
            src_ip: self.src_ip,
        })
    }
}

impl Joining {
    /// Sends `t` on `socket`, or holds it to be joined with what follows
    /// ([`Joining`]).
    fn send(
        &mut self,
        socket: &Arc<dyn quinn::AsyncUdpSocket>,
        t: &quinn::udp::Transmit,
    ) -> std::io::Result<()> {
        if let Some(held) = &mut self.held {
            if held.takes(socket, t) {
                let before = held.contents.len();
                held.contents.extend_from_slice(t.contents);
                if full_transmit(t).is_some() && held.has_room() {
                    return Ok(());
                }
                let sent = held.send();
                if sent
                    .as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
                {
                    // quinn keeps `t` and offers it again.
                    held.contents.truncate(before);
                    return sent;
                }
                self.recycle();
                return sent;
            }
            // What is held leaves first; a full socket refuses `t` too.
            self.flush()?;
        }
        if let Some(segment_size) = full_transmit(t).filter(|_| {
            self.active
                && socket.max_transmit_segments() >= 2 * QUINN_TRANSMIT_SEGMENTS
                && 2 * t.contents.len() <= MAX_JOINED_BYTES
        }) {
            let mut contents = std::mem::take(&mut self.spare);
            contents.clear();
            contents.extend_from_slice(t.contents);
            self.held = Some(Joined {
                socket: socket.clone(),
                destination: t.destination,
                ecn: t.ecn,
                src_ip: t.src_ip,
                segment_size,
                contents,
            });
            return Ok(());
        }
        socket.try_send(t)
    }

    /// Sends what is held, if anything. Only a full socket keeps it
    /// (`WouldBlock`).
    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(Err(e)) = self.held.as_ref().map(Joined::send)
            && e.kind() == std::io::ErrorKind::WouldBlock
        {
            return Err(e);
        }
        self.recycle();
        Ok(())
    }

    /// Drops what is held, keeping its buffer for the next joined send.
    fn recycle(&mut self) {
        if let Some(held) = self.held.take() {
            self.spare = held.contents;
        }
    }
}

/// A joined send that found the socket full at the end of its driver's
/// poll, and the poller that wakes the driver when the socket can take it.
struct Unsent {
    joined: Joined,
    _poller: std::pin::Pin<Box<dyn quinn::UdpPoller>>,
}

/// Sends what the driver polled on this thread holds ([`Joining`]) at the
/// end of its poll. If the socket is full, it is returned with the driver
/// registered (through `cx`) to be woken when the socket is writable.
fn send_held(cx: &mut std::task::Context<'_>) -> Option<Box<Unsent>> {
    loop {
        let joined = JOINING.with(|j| {
            let mut j = j.borrow_mut();
            match j.flush() {
                Ok(()) => None,
                Err(_) => j.held.take(),
            }
        })?;
        let mut poller = joined.socket.clone().create_io_poller();
        match poller.as_mut().poll_writable(cx) {
            std::task::Poll::Pending => {
                return Some(Box::new(Unsent {
                    joined,
                    _poller: poller,
                }));
            }
            // Writable again: another try.
            std::task::Poll::Ready(Ok(())) => {
                JOINING.with(|j| j.borrow_mut().held = Some(joined));
            }
            // The socket is broken: its sends are lost.
            std::task::Poll::Ready(Err(_)) => return None,
        }
    }
}

/// A future polled again at once when it wakes itself during its poll
/// (at most [`MAX_REPOLLS`] times in a row).
struct RepollSelfWake {
    future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    state: Arc<WakeState>,
    /// The waker the inner future sees: wakes during a poll only mark it.
    waker: std::task::Waker,
    /// A joined send of the driver's that found the socket full
    /// ([`Joining`]): sent first at its next poll.
    unsent: Option<Box<Unsent>>,
    /// The inner future has completed; the wrapper completes once nothing
    /// is left unsent.
    done: bool,
}

/// Whether the inner future is being polled, whether it was woken since
/// its poll began, and the scheduler's waker for wakes between polls.
#[derive(Default)]
struct WakeState {
    polling: std::sync::atomic::AtomicBool,
    woken: std::sync::atomic::AtomicBool,
    outer: futures_util::task::AtomicWaker,
    /// The driver has once sent [`BATCHING_AFTER`] datagrams in one poll:
    /// its transmits may be batches ([`BatchGatedSocket`]).
    batching: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.woken.store(true, SeqCst);
        // During a poll the poller sees `woken` when the poll returns;
        // otherwise (or if the poll has just ended) the scheduler is told.
        // Either way no wake is lost: the poller clears `polling` before
        // it reads `woken`.
        if !self.polling.load(SeqCst) {
            self.outer.wake();
        }
    }
}

/// The send limits and the joined sends of one driver's poll on this
/// thread ([`BatchGatedSocket`], [`Joining`]), lifted when the poll ends (a
/// driver that panics included).
struct SendGate<'a> {
    state: &'a WakeState,
}

impl<'a> SendGate<'a> {
    /// Enters a driver's poll, with what it left unsent held first.
    fn enter(state: &'a WakeState, unsent: Option<Joined>) -> Self {
        let batching = state.batching.load(std::sync::atomic::Ordering::Relaxed);
        SEGMENTS_ALLOWED.with(|s| s.set(if batching { usize::MAX } else { 1 }));
        SENT_IN_POLL.with(|n| n.set(0));
        JOINING.with(|j| {
            let mut j = j.borrow_mut();
            j.active = true;
            j.held = unsent;
        });
        Self { state }
    }
}

impl Drop for SendGate<'_> {
    fn drop(&mut self) {
        if SENT_IN_POLL.with(|n| n.replace(0)) >= BATCHING_AFTER {
            self.state
                .batching
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        SEGMENTS_ALLOWED.with(|s| s.set(usize::MAX));
        JOINING.with(|j| {
            let mut j = j.borrow_mut();
            j.active = false;
            // Sent or kept at the poll's end; only a panic leaves it here.
            j.held = None;
        });
    }
}

impl RepollSelfWake {
    fn new(future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Self {
        let state = Arc::new(WakeState::default());
        Self {
            future,
            waker: std::task::Waker::from(state.clone()),
            state,
            unsent: None,
            done: false,
        }
    }
}

impl std::future::Future for RepollSelfWake {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let this = &mut *self;
        this.state.outer.register(cx.waker());
        let _gate = SendGate::enter(&this.state, this.unsent.take().map(|u| u.joined));
        // Whether the inner future completed (or had), and if not, whether
        // it still asks to run after the re-polls.
        let (mut done, mut asking) = (this.done, !this.done);
        if !this.done {
            for _ in 0..=MAX_REPOLLS {
                this.state.woken.store(false, SeqCst);
                this.state.polling.store(true, SeqCst);
                let polled = this
                    .future
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(&this.waker));
                this.state.polling.store(false, SeqCst);
                if polled.is_ready() {
                    (done, asking) = (true, false);
                    break;
                }
                if !this.state.woken.swap(false, SeqCst) {
                    asking = false;
                    break;
                }
            }
        }
        this.done = done;
        this.unsent = send_held(cx);
        if done && this.unsent.is_none() {
            return std::task::Poll::Ready(());
        }
        if asking {
            // Still asking to run: yield to the other tasks, as without the
            // wrapper.
            cx.waker().wake_by_ref();
        }
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The configurations of a tunnel's server and of a client that trusts
    /// it, on loopback.
    fn configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"t".to_vec()];
        let transport = Arc::new(transport_config(
            Duration::from_secs(5),
            Duration::from_secs(30),
        ));
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        server_config.transport_config(transport.clone());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client_tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"t".to_vec()];
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        client_config.transport_config(transport);
        (server_config, client_config)
    }

    /// A tunnel connection pair on loopback: (client, server).
    async fn pair() -> (quinn::Connection, quinn::Connection, quinn::Endpoint) {
        let (server_config, client_config) = configs();
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config);
        let addr = server.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async { client.connect(addr, "localhost").unwrap().await.unwrap() },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (c, s, server)
    }

    /// A datagram pushed onto a full send queue is counted as displacing
    /// one waiting before it; until the queue is full, none is.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_send_queue_is_counted() {
        let (client, _server, _endpoint) = pair().await;
        let datagram = Bytes::from(vec![7u8; 1300]);
        // On this thread the connection cannot send while the loop runs:
        // the queue only fills.
        let outcomes: Vec<bool> = (0..5000)
            .map(|_| send_datagram(&client, datagram.clone()).unwrap())
            .collect();
        let first = outcomes.iter().position(|d| *d).expect("the queue filled");
        assert!(
            first * 1300 > DATAGRAM_SEND_BUFFER * 9 / 10,
            "displaced only at {first}"
        );
        assert!(outcomes[first..].iter().all(|d| *d));
    }

    /// Sends `count` datagrams of 1300 bytes from `client` in small bursts,
    /// each once the last has left, and waits until `server`'s connection
    /// has received them (or, if loopback lost a few, until its count
    /// stops growing). Returns how many it received.
    async fn burst(client: &quinn::Connection, server: &quinn::Connection, count: usize) -> u64 {
        let datagram = Bytes::from(vec![7u8; 1300]);
        for _ in 0..count / 50 {
            for _ in 0..50 {
                assert!(!send_datagram(client, datagram.clone()).unwrap());
            }
            tokio::time::timeout(Duration::from_secs(10), async {
                while client.datagram_send_buffer_space() < DATAGRAM_SEND_BUFFER - 4096 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .unwrap();
        }
        let sent_frames = client.stats().frame_tx.datagram;
        let mut received = 0;
        for _ in 0..100 {
            let now = server.stats().frame_rx.datagram;
            if now == sent_frames || (now == received && now > 0) {
                break;
            }
            received = now;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.stats().frame_rx.datagram
    }

    /// Reads every datagram waiting on `server`: (read, counted as dropped).
    async fn drain(server: &quinn::Connection) -> (u64, u64) {
        let mut reader = DatagramReader::new(server.clone());
        let mut batch = Vec::new();
        let (mut read, mut dropped) = (0, 0);
        while let Ok(Ok(d)) = tokio::time::timeout(
            Duration::from_millis(300),
            reader.next_batch(&mut batch, 64),
        )
        .await
        {
            read += batch.len() as u64;
            dropped += d;
        }
        (read, dropped)
    }

    /// Every datagram the connection received is either read or counted as
    /// dropped by its full receive queue.
    #[tokio::test]
    async fn a_full_receive_queue_is_counted() {
        let (client, server, _endpoint) = pair().await;
        // More than the receive queue holds, while the server reads
        // nothing.
        let count = DATAGRAM_RECEIVE_BUFFER * 3 / 2 / 1300 / 50 * 50;
        burst(&client, &server, count).await;
        let (read, dropped) = drain(&server).await;
        let received = server.stats().frame_rx.datagram;
        assert!(
            received as usize * 1300 > DATAGRAM_RECEIVE_BUFFER,
            "{received}"
        );
        assert!(dropped > 0);
        assert_eq!(read + dropped, received, "read {read}, dropped {dropped}");
        assert!(read as usize * 1300 <= DATAGRAM_RECEIVE_BUFFER);
    }

    /// A burst as large as the UDP socket buffer in front of the queue (and
    /// larger than the 4 MiB the queue once held) waits unread in the
    /// receive queue and is read whole.
    #[tokio::test]
    async fn a_burst_the_socket_buffer_holds_is_kept() {
        let (client, server, _endpoint) = pair().await;
        let count = crate::udp::SOCKET_BUFFER * 9 / 10 / (1300 + 64) / 50 * 50;
        assert!(count * 1300 > 4 << 20);
        let received = burst(&client, &server, count).await;
        let (read, dropped) = drain(&server).await;
        assert_eq!(dropped, 0);
        assert_eq!(read, received);
    }

    /// The queue holds at least what the socket buffer in front of it does.
    #[test]
    fn the_receive_queue_covers_the_socket_buffer() {
        assert_eq!(receive_queue_bytes(8 << 20), 8 << 20);
        assert_eq!(receive_queue_bytes(1 << 20), 4 << 20);
        const { assert!(DATAGRAM_RECEIVE_BUFFER >= crate::udp::SOCKET_BUFFER) };
    }

    /// A sender that waits for room loses nothing of a burst twice the
    /// send queue: every datagram leaves as a frame.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sender_that_waits_loses_nothing() {
        let (client, server, _endpoint) = pair().await;
        let datagram = Bytes::from(vec![7u8; 1300]);
        let count = DATAGRAM_SEND_BUFFER * 2 / 1300;
        let mut waited = false;
        for _ in 0..count {
            if try_send_datagram(&client, datagram.clone())
                .unwrap()
                .is_some()
            {
                waited = true;
                let sent = send_datagram_within(&client, datagram.clone(), Duration::from_secs(10));
                assert_eq!(sent.await.unwrap(), Sent::Queued);
            }
        }
        assert!(waited, "the queue never filled");
        // Everything queued leaves the connection as a DATAGRAM frame.
        tokio::time::timeout(Duration::from_secs(20), async {
            while client.stats().frame_tx.datagram < count as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every datagram was sent");
        assert_eq!(client.stats().frame_tx.datagram, count as u64);
        drop(server);
    }

    /// Counts the losses it is told of; its window shrinks with each.
    #[derive(Clone, Default)]
    struct Recorder {
        losses: u64,
        persistent: u64,
    }

    impl Controller for Recorder {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, persistent: bool, _: u64) {
            self.losses += 1;
            self.persistent += u64::from(persistent);
        }
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            1_000_000 >> self.losses
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            1_000_000
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    /// Random losses never reach the inner controller; persistent
    /// congestion does.
    #[test]
    fn only_persistent_congestion_reaches_the_controller() {
        let now = Instant::now();
        let mut cc = LossTolerant(Box::new(Recorder::default()));
        for _ in 0..100 {
            cc.on_congestion_event(now, now, false, 1400);
        }
        assert_eq!(cc.window(), 1_000_000);
        cc.on_congestion_event(now, now, true, 1400);
        assert_eq!(cc.window(), 500_000);
        let inner = cc.0.into_any().downcast::<Recorder>().ok();
        assert_eq!(inner.map(|r| (r.losses, r.persistent)), Some((1, 1)));
    }

    /// The factory builds quinn's BBR behind the filter.
    #[test]
    fn tunnels_use_bbr() {
        let now = Instant::now();
        let cc = Arc::new(TunnelCongestion::default()).build(now, TUNNEL_UDP_PAYLOAD);
        let inner = cc
            .into_any()
            .downcast::<LossTolerant>()
            .ok()
            .and_then(|l| l.0.into_any().downcast::<quinn::congestion::Bbr>().ok());
        assert!(inner.is_some());
    }

    /// Counts the wakes of the scheduler's waker.
    #[derive(Default)]
    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A driver-like future: on each of its first `self_wakes` polls it
    /// wakes itself (work left over), then it waits; it keeps its last
    /// waker, as quinn's drivers do, for wakes from other tasks.
    struct Driver {
        polls: Arc<std::sync::atomic::AtomicUsize>,
        self_wakes: usize,
        stored: Arc<std::sync::Mutex<Option<std::task::Waker>>>,
    }

    impl std::future::Future for Driver {
        type Output = ();
        fn poll(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            let n = self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            *self.stored.lock().unwrap() = Some(cx.waker().clone());
            if n < self.self_wakes {
                cx.waker().wake_by_ref();
            }
            std::task::Poll::Pending
        }
    }

    /// Polls `self_wakes`-driver once through the wrapper: (inner polls,
    /// scheduler wakes, the stored waker).
    fn poll_once(self_wakes: usize) -> (usize, usize, std::task::Waker, Arc<CountWakes>) {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stored = Arc::new(std::sync::Mutex::new(None));
        let mut wrapped = RepollSelfWake::new(Box::pin(Driver {
            polls: polls.clone(),
            self_wakes,
            stored: stored.clone(),
        }));
        let outer = Arc::new(CountWakes::default());
        let waker = std::task::Waker::from(outer.clone());
        let polled =
            std::pin::Pin::new(&mut wrapped).poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending());
        let stored = stored.lock().unwrap().clone().unwrap();
        // The stored waker keeps the wrapper's state.
        drop(wrapped);
        (
            polls.load(std::sync::atomic::Ordering::SeqCst),
            outer.0.load(std::sync::atomic::Ordering::SeqCst),
            stored,
            outer,
        )
    }

    /// A driver that wakes itself once is polled again in place: the
    /// scheduler is not asked to run it again (which, in a multi-threaded
    /// runtime, wakes another thread).
    #[test]
    fn a_self_wake_is_polled_again_in_place() {
        let (polls, wakes, _, _) = poll_once(1);
        assert_eq!((polls, wakes), (2, 0));
    }

    /// A driver that keeps waking itself yields after the re-polls, as it
    /// would without the wrapper.
    #[test]
    fn a_driver_that_keeps_asking_yields() {
        let (polls, wakes, _, _) = poll_once(usize::MAX);
        assert_eq!((polls, wakes), (1 + MAX_REPOLLS, 1));
    }

    /// A wake between polls (another task queued work for the driver)
    /// reaches the scheduler.
    #[test]
    fn a_wake_between_polls_reaches_the_scheduler() {
        let (polls, wakes, stored, outer) = poll_once(0);
        assert_eq!((polls, wakes), (1, 0));
        stored.wake_by_ref();
        assert_eq!(outer.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A driver-like future that, on each poll, records how many segments
    /// the socket offers it and sends `per_poll` datagrams to `to`.
    struct Sender {
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        to: std::net::SocketAddr,
        per_poll: usize,
        offered: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl std::future::Future for Sender {
        type Output = ();
        fn poll(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            self.offered
                .lock()
                .unwrap()
                .push(self.socket.max_transmit_segments());
            for _ in 0..self.per_poll {
                let transmit = quinn::udp::Transmit {
                    destination: self.to,
                    ecn: None,
                    contents: &[0u8; 100],
                    segment_size: None,
                    src_ip: None,
                };
                self.socket.try_send(&transmit).unwrap();
            }
            std::task::Poll::Pending
        }
    }

    /// Polls a driver sending `per_poll` datagrams a poll three times
    /// through the tunnel runtime's wrapper, on the runtime's gated socket:
    /// the segments the socket offered at each poll, and what it offers
    /// outside a driver's poll.
    fn offered_segments(per_poll: usize) -> (Vec<usize>, usize) {
        let socket: Arc<dyn quinn::AsyncUdpSocket> = Arc::new(BatchGatedSocket {
            inner: Arc::new(Recording::with_segments(10)),
        });
        let offered = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut driver = RepollSelfWake::new(Box::pin(Sender {
            socket: socket.clone(),
            to: "127.0.0.1:9".parse().unwrap(),
            per_poll,
            offered: offered.clone(),
        }));
        let waker = std::task::Waker::from(Arc::new(CountWakes::default()));
        for _ in 0..3 {
            let polled =
                std::pin::Pin::new(&mut driver).poll(&mut std::task::Context::from_waker(&waker));
            assert!(polled.is_pending());
        }
        let offered = offered.lock().unwrap().clone();
        (offered, socket.max_transmit_segments())
    }

    /// A driver that sends a few datagrams at a time (a handshake, an idle
    /// connection's keepalives) is offered single datagrams only, so quinn
    /// never grows its send buffer for a batch; one that sends a backlog
    /// is offered batches from its next poll on. Outside a driver's poll
    /// the socket's own limit holds.
    #[test]
    fn batches_are_offered_to_drivers_with_a_backlog() {
        let inner = 10;
        let (quiet, outside) = offered_segments(BATCHING_AFTER - 1);
        assert_eq!(quiet, vec![1, 1, 1]);
        assert_eq!(outside, inner);
        let (busy, _) = offered_segments(BATCHING_AFTER);
        assert_eq!(busy, vec![1, inner, inner]);
    }

    /// One send as the socket below the joining saw it.
    #[derive(Debug, Clone, PartialEq)]
    struct Recorded {
        destination: std::net::SocketAddr,
        ecn: Option<quinn::udp::EcnCodepoint>,
        segment_size: Option<usize>,
        contents: Vec<u8>,
    }

    /// A socket that records its sends (up to `max_segments` datagrams
    /// each) and can be made full: it then refuses them with `WouldBlock`,
    /// and its pollers wait until it is made writable again.
    #[derive(Debug, Default)]
    struct Recording {
        max_segments: usize,
        sent: std::sync::Mutex<Vec<Recorded>>,
        full: std::sync::atomic::AtomicBool,
        waiting: std::sync::Mutex<Vec<std::task::Waker>>,
    }

    impl Recording {
        fn with_segments(max_segments: usize) -> Self {
            Self {
                max_segments,
                ..Self::default()
            }
        }
        fn sent(&self) -> Vec<Recorded> {
            self.sent.lock().unwrap().clone()
        }
        fn sends(&self) -> usize {
            self.sent.lock().unwrap().len()
        }
        fn set_full(&self, full: bool) {
            self.full.store(full, std::sync::atomic::Ordering::SeqCst);
            if !full {
                for w in self.waiting.lock().unwrap().drain(..) {
                    w.wake();
                }
            }
        }
    }

    #[derive(Debug)]
    struct RecordingPoller(Arc<Recording>);

    impl quinn::UdpPoller for RecordingPoller {
        fn poll_writable(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0.full.load(std::sync::atomic::Ordering::SeqCst) {
                self.0.waiting.lock().unwrap().push(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Ok(()))
            }
        }
    }

    impl quinn::AsyncUdpSocket for Recording {
        fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
            Box::pin(RecordingPoller(self))
        }
        fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            assert!(datagrams(t) <= self.max_segments && t.contents.len() <= MAX_JOINED_BYTES);
            self.sent.lock().unwrap().push(Recorded {
                destination: t.destination,
                ecn: t.ecn,
                segment_size: t.segment_size,
                contents: t.contents.to_vec(),
            });
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut std::task::Context,
            _: &mut [std::io::IoSliceMut<'_>],
            _: &mut [quinn::udp::RecvMeta],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            Ok("127.0.0.1:9".parse().unwrap())
        }
        fn max_transmit_segments(&self) -> usize {
            self.max_segments
        }
    }

    /// A transmit a driver hands over: `count` datagrams of `size` bytes
    /// (the last `last` bytes) to `to`, each filled with its own byte.
    #[derive(Clone, Copy)]
    struct Batch {
        to: u16,
        ecn: Option<quinn::udp::EcnCodepoint>,
        size: usize,
        count: usize,
        last: usize,
        fill: u8,
    }

    /// `count` full datagrams of `size` bytes to port `to`.
    fn batch(to: u16, size: usize, count: usize, fill: u8) -> Batch {
        Batch {
            to,
            ecn: None,
            size,
            count,
            last: size,
            fill,
        }
    }

    impl Batch {
        fn contents(&self) -> Vec<u8> {
            (0..self.count)
                .flat_map(|i| {
                    let len = if i + 1 == self.count {
                        self.last
                    } else {
                        self.size
                    };
                    std::iter::repeat_n(self.fill.wrapping_add(i as u8), len)
                })
                .collect()
        }
        fn destination(&self) -> std::net::SocketAddr {
            std::net::SocketAddr::from(([127, 0, 0, 1], self.to))
        }
    }

    /// What a driver's try_send answered, and how many sends the socket
    /// below had made right after.
    type Answers = Arc<std::sync::Mutex<Vec<(Result<(), std::io::ErrorKind>, usize)>>>;

    /// A driver-like future that hands over the transmits of one poll per
    /// poll, then completes (or waits, with `completes` false).
    struct Transmitter {
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        below: Arc<Recording>,
        polls: std::collections::VecDeque<Vec<Batch>>,
        answers: Answers,
        completes: bool,
    }

    impl std::future::Future for Transmitter {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            let Some(batches) = self.polls.pop_front() else {
                return if self.completes {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                };
            };
            for b in batches {
                let contents = b.contents();
                let answer = self
                    .socket
                    .try_send(&quinn::udp::Transmit {
                        destination: b.destination(),
                        ecn: b.ecn,
                        contents: &contents,
                        segment_size: (b.count > 1).then_some(b.size),
                        src_ip: None,
                    })
                    .map_err(|e| e.kind());
                let sends = self.below.sends();
                self.answers.lock().unwrap().push((answer, sends));
            }
            std::task::Poll::Pending
        }
    }

    /// A driver handing over `polls` through the tunnel runtime's wrapper
    /// and socket, batching from the start; the socket below, the answers.
    fn transmitter(
        polls: Vec<Vec<Batch>>,
        completes: bool,
    ) -> (RepollSelfWake, Arc<Recording>, Answers) {
        let below = Arc::new(Recording::with_segments(64));
        let answers = Answers::default();
        let driver = RepollSelfWake::new(Box::pin(Transmitter {
            socket: Arc::new(BatchGatedSocket {
                inner: below.clone(),
            }),
            below: below.clone(),
            polls: polls.into(),
            answers: answers.clone(),
            completes,
        }));
        driver
            .state
            .batching
            .store(true, std::sync::atomic::Ordering::SeqCst);
        (driver, below, answers)
    }

    /// Polls the wrapper once: whether it completed, and how often it
    /// asked the scheduler to run it again since `wakes` was made.
    fn poll_with(driver: &mut RepollSelfWake, wakes: &Arc<CountWakes>) -> bool {
        let waker = std::task::Waker::from(wakes.clone());
        std::pin::Pin::new(driver)
            .poll(&mut std::task::Context::from_waker(&waker))
            .is_ready()
    }

    fn recorded(b: &[Batch]) -> Recorded {
        let count: usize = b.iter().map(|b| b.count).sum();
        Recorded {
            destination: b[0].destination(),
            ecn: b[0].ecn,
            segment_size: (count > 1).then_some(b[0].size),
            contents: b.iter().flat_map(Batch::contents).collect(),
        }
    }

    /// A transmit that is not a full batch (a lone packet, the end of a
    /// burst) leaves during its try_send, as without joining.
    #[test]
    fn a_lone_transmit_is_sent_at_once() {
        let lone = batch(1, 200, 1, 1);
        let few = batch(1, 1400, 3, 2);
        let (mut driver, below, answers) = transmitter(vec![vec![lone], vec![few]], false);
        let wakes = Arc::new(CountWakes::default());
        assert!(!poll_with(&mut driver, &wakes));
        assert!(!poll_with(&mut driver, &wakes));
        assert_eq!(*answers.lock().unwrap(), vec![(Ok(()), 1), (Ok(()), 2)]);
        assert_eq!(below.sent(), vec![recorded(&[lone]), recorded(&[few])]);
    }

    /// The two full batches quinn sends in one poll, and the shorter one
    /// that ends its burst, leave as one send; two full batches alone leave
    /// as one when the poll ends.
    #[test]
    fn the_batches_of_one_poll_leave_as_one_send() {
        let first = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 10);
        let second = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 30);
        let mut end = batch(1, 1400, 4, 50);
        end.last = 500;
        let (mut driver, below, answers) =
            transmitter(vec![vec![first, second, end], vec![first, second]], false);
        let wakes = Arc::new(CountWakes::default());
        assert!(!poll_with(&mut driver, &wakes));
        // Held, held, then all three in one send.
        assert_eq!(
            *answers.lock().unwrap(),
            vec![(Ok(()), 0), (Ok(()), 0), (Ok(()), 1)]
        );
        assert_eq!(below.sent(), vec![recorded(&[first, second, end])]);
        assert_eq!(below.sent()[0].contents.len(), 24 * 1400 - 900);
        assert!(!poll_with(&mut driver, &wakes));
        assert_eq!(answers.lock().unwrap()[3..], [(Ok(()), 1), (Ok(()), 1)]);
        assert_eq!(
            below.sent(),
            vec![recorded(&[first, second, end]), recorded(&[first, second])]
        );
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A joined send stays within 64 KiB and the socket's 64 datagrams.
    #[test]
    fn a_joined_send_stays_within_the_limits() {
        let large: Vec<Batch> = (0..5)
            .map(|i| batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 10 * i))
            .collect();
        let small: Vec<Batch> = (0..7)
            .map(|i| batch(1, 100, QUINN_TRANSMIT_SEGMENTS, 10 * i))
            .collect();
        let (mut driver, below, _) = transmitter(vec![large.clone(), small.clone()], false);
        let wakes = Arc::new(CountWakes::default());
        assert!(!poll_with(&mut driver, &wakes));
        // 4 x 14,000 bytes; a fifth would pass 65,507.
        assert_eq!(
            below.sent(),
            vec![recorded(&large[..4]), recorded(&large[4..])]
        );
        assert!(!poll_with(&mut driver, &wakes));
        // 60 datagrams; 70 would pass the socket's 64.
        assert_eq!(
            below.sent()[2..],
            [recorded(&small[..6]), recorded(&small[6..])]
        );
    }

    /// Batches to another destination, with other ECN marks or of another
    /// datagram size are not joined: each leaves apart, in order.
    #[test]
    fn transmits_that_differ_are_not_joined() {
        let a = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 1);
        let other_destination = batch(2, 1400, QUINN_TRANSMIT_SEGMENTS, 2);
        let mut marked = batch(2, 1400, QUINN_TRANSMIT_SEGMENTS, 3);
        marked.ecn = Some(quinn::udp::EcnCodepoint::Ect0);
        let mut other_size = batch(2, 1300, QUINN_TRANSMIT_SEGMENTS, 4);
        other_size.ecn = marked.ecn;
        let mut after_short = batch(2, 1300, 2, 5);
        after_short.last = 700;
        after_short.ecn = marked.ecn;
        let mut then = batch(2, 1300, QUINN_TRANSMIT_SEGMENTS, 6);
        then.ecn = marked.ecn;
        let polls = vec![a, other_destination, marked, other_size, after_short, then];
        let (mut driver, below, answers) = transmitter(vec![polls], false);
        let wakes = Arc::new(CountWakes::default());
        assert!(!poll_with(&mut driver, &wakes));
        assert_eq!(
            answers
                .lock()
                .unwrap()
                .iter()
                .map(|a| a.1)
                .collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 4]
        );
        assert_eq!(
            below.sent(),
            vec![
                recorded(&[a]),
                recorded(&[other_destination]),
                recorded(&[marked]),
                recorded(&[other_size, after_short]),
                recorded(&[then]),
            ]
        );
    }

    /// A joined send that finds the socket full is kept, never dropped:
    /// while the socket is full the driver's next transmit is refused (quinn
    /// keeps it), and once the socket is writable the driver is woken and
    /// the joined send leaves first, whole. A driver that completed with a
    /// send kept completes once it has left.
    #[test]
    fn a_full_socket_keeps_the_joined_send() {
        let first = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 10);
        let second = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 30);
        let lone = batch(2, 300, 1, 70);
        let (mut driver, below, answers) =
            transmitter(vec![vec![first, second], vec![lone], vec![lone]], true);
        let wakes = Arc::new(CountWakes::default());
        below.set_full(true);
        assert!(!poll_with(&mut driver, &wakes));
        // Both accepted, nothing sent, the driver waits for the socket.
        assert_eq!(*answers.lock().unwrap(), vec![(Ok(()), 0), (Ok(()), 0)]);
        assert!(driver.unsent.is_some());
        assert_eq!(below.waiting.lock().unwrap().len(), 1);
        // Woken for nothing else: the lone packet is refused.
        assert!(!poll_with(&mut driver, &wakes));
        assert_eq!(
            answers.lock().unwrap()[2],
            (Err(std::io::ErrorKind::WouldBlock), 0)
        );
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        below.set_full(false);
        assert!(wakes.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
        // The joined send leaves before the lone packet offered again.
        assert!(!poll_with(&mut driver, &wakes));
        assert_eq!(answers.lock().unwrap()[3], (Ok(()), 2));
        assert_eq!(
            below.sent(),
            vec![recorded(&[first, second]), recorded(&[lone])]
        );
        // A driver that completes with a send kept.
        let (mut driver, below, _) = transmitter(vec![vec![first, second]], true);
        below.set_full(true);
        assert!(!poll_with(&mut driver, &wakes));
        assert!(!poll_with(&mut driver, &wakes));
        below.set_full(false);
        assert!(poll_with(&mut driver, &wakes));
        assert_eq!(below.sent(), vec![recorded(&[first, second])]);
    }

    /// Outside a driver's poll nothing is held: a full batch leaves at once.
    #[test]
    fn nothing_is_held_outside_a_drivers_poll() {
        let below = Arc::new(Recording::with_segments(64));
        let socket = BatchGatedSocket {
            inner: below.clone(),
        };
        let b = batch(1, 1400, QUINN_TRANSMIT_SEGMENTS, 1);
        let contents = b.contents();
        quinn::AsyncUdpSocket::try_send(
            &socket,
            &quinn::udp::Transmit {
                destination: b.destination(),
                ecn: None,
                contents: &contents,
                segment_size: Some(1400),
                src_ip: None,
            },
        )
        .unwrap();
        assert_eq!(below.sent(), vec![recorded(&[b])]);
    }

    /// The sends of a real UDP socket below the joining: how many, and the
    /// most datagrams one carried.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn quinn::AsyncUdpSocket>,
        sends: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl quinn::AsyncUdpSocket for Counting {
        fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
            self.inner.clone().create_io_poller()
        }
        fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
            self.inner.try_send(t)?;
            self.sends
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.most
                .fetch_max(datagrams(t), std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn poll_recv(
            &self,
            cx: &mut std::task::Context,
            bufs: &mut [std::io::IoSliceMut<'_>],
            meta: &mut [quinn::udp::RecvMeta],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.inner.poll_recv(cx, bufs, meta)
        }
        fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            self.inner.local_addr()
        }
        fn max_transmit_segments(&self) -> usize {
            self.inner.max_transmit_segments()
        }
        fn max_receive_segments(&self) -> usize {
            self.inner.max_receive_segments()
        }
        fn may_fragment(&self) -> bool {
            self.inner.may_fragment()
        }
    }

    /// A stream of 16 MB from a tunnel runtime's endpoint over loopback
    /// arrives intact, and quinn's batches of 10 left joined (the kernel
    /// took them: segmentation offload is still on).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quinn_sends_joined_batches() {
        let (server_config, client_config) = configs();
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::udp::tune_socket(&std_socket);
        let counting = Arc::new(Counting {
            inner: quinn::default_runtime()
                .unwrap()
                .wrap_udp_socket(std_socket)
                .unwrap(),
            sends: Default::default(),
            most: Default::default(),
        });
        if counting.inner.max_transmit_segments() < 2 * QUINN_TRANSMIT_SEGMENTS {
            eprintln!("no segmentation offload here: nothing to join");
            return;
        }
        let mut client = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            Arc::new(BatchGatedSocket {
                inner: counting.clone(),
            }),
            runtime().unwrap(),
        )
        .unwrap();
        client.set_default_client_config(client_config);
        let addr = server.local_addr().unwrap();
        let data: Vec<u8> = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
        let (conn, received) = tokio::join!(
            async {
                let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
                let mut send = conn.open_uni().await.unwrap();
                send.write_all(&data).await.unwrap();
                send.finish().unwrap();
                conn
            },
            async {
                let conn = server.accept().await.unwrap().await.unwrap();
                let mut recv = conn.accept_uni().await.unwrap();
                recv.read_to_end(32_000_000).await.unwrap()
            }
        );
        assert!(received == data, "the stream arrived altered");
        let most = counting.most.load(std::sync::atomic::Ordering::Relaxed);
        let sends = counting.sends.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            most > QUINN_TRANSMIT_SEGMENTS,
            "at most {most} datagrams in each of {sends} sends"
        );
        // The kernel took them: quinn-udp turns offload off on a refusal.
        assert!(counting.inner.max_transmit_segments() > 1);
        drop(conn);
    }
}
