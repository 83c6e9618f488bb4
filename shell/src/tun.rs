//! TUN devices with segmentation offload: one read of an offloading device
//! yields a whole TCP burst, split here into packets; a batch of packets is
//! written coalesced into large segments, so the kernel handles a few big
//! packets instead of many small ones.

/// Room for the virtio-net header in front of packets written to an
/// offloading device.
pub const VNET_HDR: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Largest read of an offloading device: its virtio-net header and a
/// coalesced 64 KiB segment.
const ORIGINAL: usize = VNET_HDR + 65_536;

/// Writes one packet, with an empty virtio-net header when the device
/// offloads.
pub async fn write_one(
    dev: &tun_rs::AsyncDevice,
    offload: bool,
    packet: &[u8],
) -> std::io::Result<usize> {
    if offload {
        dev.send(&with_vnet_hdr(packet)).await
    } else {
        dev.send(packet).await
    }
}

/// `packet` behind an empty virtio-net header, as an offloading device
/// takes it.
pub fn with_vnet_hdr(packet: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(VNET_HDR + packet.len());
    buf.resize(VNET_HDR, 0);
    buf.extend_from_slice(packet);
    buf
}

/// Reads a device a batch of packets at a time, into buffers reused from
/// one read to the next. Each packet lands after `headroom` bytes of its
/// buffer, so a header can be written in front of it without a copy.
pub struct BatchReader {
    original: Vec<u8>,
    /// The packets' buffers: views of one zeroed allocation, large enough
    /// to be mapped on its own, so its pages cost nothing until a packet is
    /// read into them (a session's pumps start on the way to its first
    /// packet; 128 buffers allocated one by one cost a page fault each).
    bufs: Vec<bytes::BytesMut>,
    sizes: Vec<usize>,
    headroom: usize,
    filled: usize,
}

impl BatchReader {
    /// A reader of up to `batch` packets per read, each up to `packet_room`
    /// bytes, after `headroom` bytes.
    pub fn new(batch: usize, packet_room: usize, headroom: usize) -> Self {
        let batch = batch.max(1);
        let room = headroom + packet_room.max(1);
        let mut block = bytes::BytesMut::zeroed(batch * room);
        Self {
            original: vec![0u8; ORIGINAL],
            bufs: (0..batch).map(|_| block.split_to(room)).collect(),
            sizes: vec![0usize; batch],
            headroom,
            filled: 0,
        }
    }

    /// Waits for the next packets of `dev`; returns how many arrived.
    pub async fn read(&mut self, dev: &tun_rs::AsyncDevice) -> std::io::Result<usize> {
        self.filled = 0;
        let n = dev
            .recv_multiple(
                &mut self.original,
                &mut self.bufs,
                &mut self.sizes,
                self.headroom,
            )
            .await?;
        self.filled = n;
        Ok(n)
    }

    /// The packets of the last read, each with the headroom in front of it
    /// (the packet starts `headroom` bytes in).
    pub fn framed_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        let headroom = self.headroom;
        self.bufs
            .iter_mut()
            .zip(&self.sizes)
            .take(self.filled)
            .filter_map(move |(buf, &size)| buf.get_mut(..headroom + size))
    }

    /// The packets of the last read.
    pub fn packets_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        let headroom = self.headroom;
        self.framed_mut()
            .filter_map(move |framed| framed.get_mut(headroom..))
    }
}

/// Reusable buffers for packets to write to a device in one batch, each
/// with room for the virtio-net header in front and for a coalesced 64 KiB
/// segment, so writing never reallocates. The buffers are made as packets
/// come, up to [`tun_rs::IDEAL_BATCH_SIZE`]: made all at once, 128 buffers
/// of 64 KiB cost a session's start about a page fault each.
#[derive(Default)]
pub struct WriteBatch {
    pool: Vec<bytes::BytesMut>,
    ready: usize,
    gro: tun_rs::GROTable,
}

impl WriteBatch {
    /// Whether the batch has room for another packet.
    pub fn has_room(&self) -> bool {
        self.ready < tun_rs::IDEAL_BATCH_SIZE
    }

    /// Adds a copy of `packet`; returns it, to change in place, or
    /// [`BatchFull`] when the batch has no room: write the batch (which
    /// empties it) and push the packet again, or count it as dropped.
    pub fn push(&mut self, packet: &[u8]) -> Result<&mut [u8], BatchFull> {
        if self.ready >= tun_rs::IDEAL_BATCH_SIZE {
            return Err(BatchFull);
        }
        if self.pool.len() <= self.ready {
            self.pool.push(bytes::BytesMut::with_capacity(ORIGINAL));
        }
        let b = self.pool.get_mut(self.ready).ok_or(BatchFull)?;
        b.clear();
        b.resize(VNET_HDR, 0);
        b.extend_from_slice(packet);
        self.ready += 1;
        b.get_mut(VNET_HDR..).ok_or(BatchFull)
    }

    /// Packets added since the last write.
    pub fn len(&self) -> usize {
        self.ready
    }

    /// Whether no packet was added since the last write.
    pub fn is_empty(&self) -> bool {
        self.ready == 0
    }

    /// Takes the packets added since the last write, each framed after
    /// [`VNET_HDR`] bytes, and empties the batch.
    #[cfg(test)]
    fn take(&mut self) -> &mut [bytes::BytesMut] {
        let ready = std::mem::take(&mut self.ready);
        self.pool.get_mut(..ready).unwrap_or_default()
    }

    /// Writes the packets added since the last write.
    pub async fn write(&mut self, dev: &tun_rs::AsyncDevice, offload: bool) -> std::io::Result<()> {
        if self.ready == 0 {
            return Ok(());
        }
        let ready = std::mem::take(&mut self.ready);
        let batch = self.pool.get_mut(..ready).unwrap_or_default();
        write_batch(dev, offload, &mut self.gro, batch).await
    }
}

/// Packets on their way to a device: on an offloading device the TCP
/// segments of a flow are coalesced as they are added ([`Coalescer`]: each
/// packet copied once, nothing allocated per packet), otherwise each packet
/// is written on its own ([`WriteBatch`]).
pub struct DeviceBatch {
    batch: DeviceBatchKind,
    /// Packets added since the last write.
    pending: usize,
}

enum DeviceBatchKind {
    Coalesced(Coalescer),
    Plain(WriteBatch),
}

impl DeviceBatch {
    /// A batch for a device that offloads (`offload`) or not.
    pub fn new(offload: bool) -> Self {
        let batch = if offload {
            DeviceBatchKind::Coalesced(Coalescer::default())
        } else {
            DeviceBatchKind::Plain(WriteBatch::default())
        };
        Self { batch, pending: 0 }
    }

    /// Whether another packet can be added before the next write.
    pub fn has_room(&self) -> bool {
        match &self.batch {
            DeviceBatchKind::Coalesced(c) => c.has_room(),
            DeviceBatchKind::Plain(b) => b.has_room(),
        }
    }

    /// Packets added since the last write.
    pub fn len(&self) -> usize {
        self.pending
    }

    /// Whether no packet was added since the last write.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Adds a copy of `packet`, or says there is no room: write, then add
    /// it again.
    pub fn push(&mut self, packet: &[u8]) -> Result<(), BatchFull> {
        match &mut self.batch {
            DeviceBatchKind::Coalesced(c) => c.push(packet)?,
            DeviceBatchKind::Plain(b) => {
                b.push(packet)?;
            }
        }
        self.pending += 1;
        Ok(())
    }

    /// Writes what was added since the last write to `dev`. A failed
    /// write loses its packets, as a full device queue would.
    pub async fn write(&mut self, dev: &tun_rs::AsyncDevice) -> std::io::Result<()> {
        if std::mem::take(&mut self.pending) == 0 {
            return Ok(());
        }
        match &mut self.batch {
            DeviceBatchKind::Coalesced(c) => c.write(dev).await,
            DeviceBatchKind::Plain(b) => b.write(dev, false).await,
        }
    }

    /// Adds a copy of `packet`, first writing to `dev` when there is no
    /// room, so no packet is left out; the error is that write's.
    pub async fn push_or_write(
        &mut self,
        dev: &tun_rs::AsyncDevice,
        packet: &[u8],
    ) -> std::io::Result<()> {
        let mut result = Ok(());
        if self.push(packet).is_err() {
            result = self.write(dev).await;
            let _ = self.push(packet);
        }
        result
    }
}

/// A packet [`WriteBatch::push`] had no room for; it was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the write batch is full: write it, then add the packet again")]
pub struct BatchFull;

/// Writes packets framed for the device (each after [`VNET_HDR`] bytes of
/// room), coalescing consecutive segments of a TCP flow into large ones
/// when the device offloads: the kernel then forwards and receives one
/// packet where it would have handled dozens. The buffers need room to grow
/// to 64 KiB. Without offload, each packet is written on its own: one the
/// device refuses does not hold back the others, and the first error is
/// returned.
pub async fn write_batch(
    dev: &tun_rs::AsyncDevice,
    offload: bool,
    gro: &mut tun_rs::GROTable,
    batch: &mut [bytes::BytesMut],
) -> std::io::Result<()> {
    if offload {
        dev.send_multiple(gro, batch, VNET_HDR).await?;
        return Ok(());
    }
    let mut first = Ok(());
    for b in batch.iter() {
        if let Err(e) = dev.send(b.get(VNET_HDR..).unwrap_or_default()).await
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}

/// Segments of one flow the coalescer looks back over for a packet to
/// append to: the newest segment of each flow among the last this many.
const LOOK_BACK: usize = 8;

/// Largest IP packet a coalesced segment may grow to (the IPv4 total and
/// IPv6 payload length fields).
const MAX_SEGMENT: usize = u16::MAX as usize;

/// Packets to write to an offloading device, coalesced into large TCP
/// segments as they are added: each packet is copied once, either as the
/// start of a segment or as payload appended to the segment of its flow.
///
/// [`WriteBatch`] copies each packet into its batch and lets tun-rs
/// coalesce the batch when written, which copies each packet twice more
/// (the whole packet, then its payload) and allocates once per packet.
/// The rules for what may be coalesced are the same as there (those of
/// the kernel's GRO): consecutive TCP segments of one flow (addresses,
/// ports, acknowledgement number) with equal IP and TCP options, only ACK
/// (and PSH on the last) set, none longer than the first, a shorter one
/// or one with PSH last, each with a valid checksum. Packets that are not
/// TCP go through a [`WriteBatch`] (tun-rs coalesces UDP where the device
/// offers it); TCP packets that cannot be coalesced are written as they
/// are.
pub struct Coalescer {
    pool: Vec<bytes::BytesMut>,
    /// What each buffer in use holds, in the order they are written.
    segments: Vec<Option<Segment>>,
    others: WriteBatch,
}

/// A TCP segment being built in a buffer.
#[derive(Clone, Copy)]
struct Segment {
    flow: Flow,
    iph_len: usize,
    tcph_len: usize,
    gso_size: usize,
    next_seq: u32,
    merged: usize,
    /// A shorter packet or one with PSH was appended: nothing may follow.
    closed: bool,
}

/// What identifies the packets that may be coalesced: addresses, ports,
/// acknowledgement number, IP version.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Flow {
    addrs: [u8; 32],
    ports: [u8; 4],
    ack: [u8; 4],
    v6: bool,
}

/// A TCP packet that may be coalesced.
struct Candidate {
    flow: Flow,
    iph_len: usize,
    tcph_len: usize,
    seq: u32,
    psh: bool,
    payload: usize,
}

/// The virtio-net header's flag asking the device to fill in the checksum
/// from `csum_start` and `csum_offset`.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// `packet` as a TCP segment that may be coalesced, or `None`.
fn candidate(packet: &[u8]) -> Option<Candidate> {
    let version = packet.first()? >> 4;
    let (iph_len, v6, addrs_at) = match version {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            let frag = (packet.get(6)? & 0x3f) != 0 || *packet.get(7)? != 0;
            if ihl < 20 || total != packet.len() || *packet.get(9)? != 6 || frag {
                return None;
            }
            (ihl, false, 12)
        }
        6 => {
            let payload = usize::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]));
            if packet.len() < 40 || payload != packet.len() - 40 || *packet.get(6)? != 6 {
                return None;
            }
            (40, true, 8)
        }
        _ => return None,
    };
    let tcp = packet.get(iph_len..)?;
    let tcph_len = usize::from(tcp.get(12)? >> 4) * 4;
    if !(20..=60).contains(&tcph_len) || tcp.len() <= tcph_len {
        return None;
    }
    let flags = *tcp.get(13)?;
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let addr_len = if v6 { 16 } else { 4 };
    let mut addrs = [0u8; 32];
    addrs
        .get_mut(..2 * addr_len)?
        .copy_from_slice(packet.get(addrs_at..addrs_at + 2 * addr_len)?);
    Some(Candidate {
        flow: Flow {
            addrs,
            ports: tcp.get(..4)?.try_into().ok()?,
            ack: tcp.get(8..12)?.try_into().ok()?,
            v6,
        },
        iph_len,
        tcph_len,
        seq: u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?),
        psh: flags & TCP_PSH != 0,
        payload: tcp.len() - tcph_len,
    })
}

/// The unfolded sum of the TCP pseudo-header of `packet` for `l4_len`
/// bytes of TCP header and payload.
fn pseudo_header_sum(packet: &[u8], v6: bool, l4_len: usize) -> u64 {
    let (at, len) = if v6 { (8, 32) } else { (12, 8) };
    let sum = tun_rs::checksum_no_fold(packet.get(at..at + len).unwrap_or_default(), 0);
    let l4 = u16::try_from(l4_len).unwrap_or(u16::MAX).to_be_bytes();
    tun_rs::checksum_no_fold(&[0, 6, l4[0], l4[1]], sum)
}

/// Whether the TCP checksum of `packet` is valid.
fn tcp_checksum_valid(packet: &[u8], c: &Candidate) -> bool {
    let l4 = packet.get(c.iph_len..).unwrap_or_default();
    let sum = pseudo_header_sum(packet, c.flow.v6, l4.len());
    !tun_rs::checksum(l4, sum) == 0
}

/// Whether the IP headers of two packets of one flow allow coalescing
/// them (as the kernel's GRO: traffic class and hop limit, or ToS, DF and
/// TTL, equal).
fn ip_headers_match(a: &[u8], b: &[u8], v6: bool) -> bool {
    let field = |p: &[u8], i: usize| p.get(i).copied();
    if v6 {
        field(a, 0) == field(b, 0)
            && field(a, 1).map(|x| x >> 4) == field(b, 1).map(|x| x >> 4)
            && field(a, 7) == field(b, 7)
    } else {
        field(a, 1) == field(b, 1)
            && field(a, 6).map(|x| x >> 5) == field(b, 6).map(|x| x >> 5)
            && field(a, 8) == field(b, 8)
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self {
            pool: Vec::new(),
            segments: Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE),
            others: WriteBatch::default(),
        }
    }
}

impl Coalescer {
    /// Whether another packet can be added before the next write.
    pub fn has_room(&self) -> bool {
        self.segments.len() < tun_rs::IDEAL_BATCH_SIZE && self.others.has_room()
    }

    /// Whether nothing was added since the last write.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.others.is_empty()
    }

    /// Adds a copy of `packet`, or returns [`BatchFull`] when there is no
    /// room: write, then add it again.
    pub fn push(&mut self, packet: &[u8]) -> Result<(), BatchFull> {
        let Some(c) = candidate(packet) else {
            if packet.first().map(|b| b >> 4) == Some(4) && packet.get(9) == Some(&17)
                || packet.first().map(|b| b >> 4) == Some(6) && packet.get(6) == Some(&17)
            {
                return self.others.push(packet).map(|_| ());
            }
            return self.start(packet, None);
        };
        let newest = self
            .segments
            .iter()
            .enumerate()
            .rev()
            .take(LOOK_BACK)
            .find(|(_, s)| s.is_some_and(|s| s.flow == c.flow))
            .map(|(i, _)| i);
        if let Some(i) = newest
            && self.can_append(i, packet, &c)
            && tcp_checksum_valid(packet, &c)
        {
            self.append(i, packet, &c);
            return Ok(());
        }
        let segment = tcp_checksum_valid(packet, &c).then_some(Segment {
            flow: c.flow,
            iph_len: c.iph_len,
            tcph_len: c.tcph_len,
            gso_size: c.payload,
            next_seq: c.seq.wrapping_add(c.payload as u32),
            merged: 0,
            closed: c.psh,
        });
        self.start(packet, segment)
    }

    /// Starts a buffer with `packet`.
    fn start(&mut self, packet: &[u8], segment: Option<Segment>) -> Result<(), BatchFull> {
        if self.segments.len() >= tun_rs::IDEAL_BATCH_SIZE {
            return Err(BatchFull);
        }
        let i = self.segments.len();
        if self.pool.len() <= i {
            self.pool.push(bytes::BytesMut::with_capacity(ORIGINAL));
        }
        let b = self.pool.get_mut(i).ok_or(BatchFull)?;
        b.clear();
        b.resize(VNET_HDR, 0);
        b.extend_from_slice(packet);
        self.segments.push(segment);
        Ok(())
    }

    /// Whether `packet` continues the segment in buffer `i`.
    fn can_append(&self, i: usize, packet: &[u8], c: &Candidate) -> bool {
        let (Some(Some(s)), Some(buf)) = (self.segments.get(i), self.pool.get(i)) else {
            return false;
        };
        let first = buf.get(VNET_HDR..).unwrap_or_default();
        !s.closed
            && c.seq == s.next_seq
            && c.payload <= s.gso_size
            && c.tcph_len == s.tcph_len
            && first.len() + c.payload <= MAX_SEGMENT
            && ip_headers_match(first, packet, c.flow.v6)
            && first.get(s.iph_len + 20..s.iph_len + s.tcph_len)
                == packet.get(c.iph_len + 20..c.iph_len + c.tcph_len)
    }

    /// Appends the payload of `packet` to the segment in buffer `i`.
    fn append(&mut self, i: usize, packet: &[u8], c: &Candidate) {
        let (Some(Some(s)), Some(buf)) = (self.segments.get_mut(i), self.pool.get_mut(i)) else {
            return;
        };
        buf.extend_from_slice(packet.get(c.iph_len + c.tcph_len..).unwrap_or_default());
        if c.psh
            && let Some(flags) = buf.get_mut(VNET_HDR + s.iph_len + 13)
        {
            *flags |= TCP_PSH;
        }
        s.next_seq = s.next_seq.wrapping_add(c.payload as u32);
        s.merged += 1;
        s.closed = c.psh || c.payload < s.gso_size;
    }

    /// The frames to write, each with its virtio-net header: coalesced
    /// segments with their lengths, IPv4 header checksum and TCP
    /// pseudo-header checksum for the device's segmentation offload.
    fn finish(&mut self) {
        for (s, buf) in self.segments.iter().zip(self.pool.iter_mut()) {
            let Some(s) = s.filter(|s| s.merged > 0) else {
                continue;
            };
            let frame = buf.as_mut();
            let (hdr, packet) = frame.split_at_mut(VNET_HDR);
            let len = packet.len();
            let l4_len = len - s.iph_len;
            if s.flow.v6 {
                packet[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            } else {
                packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                packet[10..12].copy_from_slice(&[0, 0]);
                let sum = !tun_rs::checksum(&packet[..s.iph_len], 0);
                packet[10..12].copy_from_slice(&sum.to_be_bytes());
            }
            let pseudo = tun_rs::checksum(&[], pseudo_header_sum(packet, s.flow.v6, l4_len));
            let at = s.iph_len + 16;
            packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
            let header = tun_rs::VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: if s.flow.v6 {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV6
                } else {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV4
                },
                hdr_len: (s.iph_len + s.tcph_len) as u16,
                gso_size: s.gso_size as u16,
                csum_start: s.iph_len as u16,
                csum_offset: 16,
            };
            let _ = header.encode(hdr);
        }
    }

    /// Writes what was added since the last write to `dev` (which must
    /// offload), one system call per segment; all are attempted, the first
    /// error is returned.
    pub async fn write(&mut self, dev: &tun_rs::AsyncDevice) -> std::io::Result<()> {
        self.finish();
        let mut first = Ok(());
        for buf in self.pool.iter().take(self.segments.len()) {
            if let Err(e) = dev.send(buf).await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        self.segments.clear();
        if let Err(e) = self.others.write(dev, true).await
            && first.is_ok()
        {
            first = Err(e);
        }
        first
    }

    /// The frames the next write would make, and empties the coalescer
    /// (packets that are not TCP are left out).
    #[cfg(test)]
    fn take_frames(&mut self) -> Vec<Vec<u8>> {
        self.finish();
        let frames = self
            .pool
            .iter()
            .take(self.segments.len())
            .map(|b| b.to_vec())
            .collect();
        self.segments.clear();
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP packet (IPv4 or IPv6) of one test flow (`flow` picks the
    /// source port) with valid checksums.
    fn tcp(v6: bool, flow: u16, seq: u32, id: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; iph + 20];
        let len = p.len() + payload.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let sum = !tun_rs::checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let t = iph;
        p[t..t + 2].copy_from_slice(&(40000 + flow).to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p.extend_from_slice(payload);
        let sum = pseudo_header_sum(&p, v6, len - iph);
        let sum = !tun_rs::checksum(&p[iph..], sum);
        p[t + 16..t + 18].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// `count` consecutive segments of `size` bytes of one flow, the last
    /// `last` bytes long and with PSH.
    fn run(v6: bool, flow: u16, count: usize, size: usize, last: usize) -> Vec<Vec<u8>> {
        let mut seq = 1000u32;
        (0..count)
            .map(|i| {
                let (len, flags) = if i + 1 == count {
                    (last, TCP_ACK | TCP_PSH)
                } else {
                    (size, TCP_ACK)
                };
                let payload: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                let p = tcp(v6, flow, seq, i as u16 + 1, flags, &payload);
                seq += len as u32;
                p
            })
            .collect()
    }

    /// The packets the device makes of `frame` (virtio-net header and
    /// packet), split as the kernel's segmentation offload does (tun-rs's
    /// implementation of it).
    fn split(frame: &[u8]) -> Vec<Vec<u8>> {
        let hdr = tun_rs::VirtioNetHdr::decode(frame).unwrap();
        let mut packet = frame[VNET_HDR..].to_vec();
        if hdr.gso_type == 0 {
            assert_eq!(hdr.flags, 0);
            return vec![packet];
        }
        let v6 = hdr.gso_type == tun_rs::VIRTIO_NET_HDR_GSO_TCPV6;
        let mut out = vec![vec![0u8; 65_536]; 64];
        let mut sizes = vec![0usize; 64];
        let n = tun_rs::gso_split(&mut packet, hdr, &mut out, &mut sizes, 0, v6).unwrap();
        out.iter()
            .zip(&sizes)
            .take(n)
            .map(|(b, &s)| b[..s].to_vec())
            .collect()
    }

    #[test]
    fn consecutive_segments_become_one_frame_that_splits_back() {
        for v6 in [false, true] {
            let packets = run(v6, 1, 9, 1_300, 700);
            let mut c = Coalescer::default();
            for p in &packets {
                c.push(p).unwrap();
            }
            let frames = c.take_frames();
            assert_eq!(frames.len(), 1, "v6 {v6}");
            let hdr = tun_rs::VirtioNetHdr::decode(&frames[0]).unwrap();
            assert_eq!(hdr.gso_size, 1_300);
            // What the kernel checks before it segments: a valid IPv4
            // header checksum, and the TCP checksum field holding the
            // pseudo-header's sum for the device to complete.
            let packet = &frames[0][VNET_HDR..];
            let iph = if v6 { 40 } else { 20 };
            if !v6 {
                assert_eq!(tun_rs::checksum(&packet[..20], 0), 0xffff);
            }
            let pseudo = tun_rs::checksum(&[], pseudo_header_sum(packet, v6, packet.len() - iph));
            assert_eq!(packet[iph + 16..iph + 18], pseudo.to_be_bytes());
            assert_eq!(split(&frames[0]), packets, "v6 {v6}");
            assert!(c.is_empty());
        }
    }

    #[test]
    fn interleaved_flows_are_coalesced_each() {
        let (a, b) = (run(false, 1, 4, 1_000, 1_000), run(false, 2, 4, 1_000, 500));
        let mut c = Coalescer::default();
        for (x, y) in a.iter().zip(&b) {
            c.push(x).unwrap();
            c.push(y).unwrap();
        }
        let frames = c.take_frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(split(&frames[0]), a);
        assert_eq!(split(&frames[1]), b);
    }

    #[test]
    fn what_cannot_be_coalesced_is_written_as_it_is() {
        let mut packets = run(false, 1, 6, 1_000, 1_000);
        // A gap in the sequence after the second packet, a bad checksum in
        // the fourth, a pure ACK (no payload) at the end.
        let gap = tcp(false, 1, 1000 + 2_500, 3, TCP_ACK, &[9u8; 1_000]);
        packets[2] = gap;
        packets[3][60] ^= 0xff;
        packets.push(tcp(false, 1, 9_000, 9, TCP_ACK, &[]));
        let mut c = Coalescer::default();
        for p in &packets {
            c.push(p).unwrap();
        }
        let frames = c.take_frames();
        let written: Vec<Vec<Vec<u8>>> = frames.iter().map(|f| split(f)).collect();
        assert_eq!(
            written,
            vec![
                packets[0..2].to_vec(),
                vec![packets[2].clone()],
                vec![packets[3].clone()],
                packets[4..6].to_vec(),
                vec![packets[6].clone()],
            ]
        );
        // The lone packets are unchanged, behind an empty header.
        for (f, p) in [(1, 2), (2, 3), (4, 6)] {
            assert_eq!(&frames[f][..VNET_HDR], &[0u8; VNET_HDR]);
            assert_eq!(&frames[f][VNET_HDR..], &packets[p][..]);
        }
    }

    #[test]
    fn a_segment_stops_below_the_ip_length_limit() {
        let packets = run(false, 1, 60, 1_400, 1_400);
        let mut c = Coalescer::default();
        for p in &packets {
            c.push(p).unwrap();
        }
        let frames = c.take_frames();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.len() - VNET_HDR <= MAX_SEGMENT));
        let back: Vec<Vec<u8>> = frames.iter().flat_map(|f| split(f)).collect();
        assert_eq!(back, packets);
    }

    #[test]
    fn a_full_batch_refuses_a_packet_instead_of_losing_it() {
        let mut batch = WriteBatch::default();
        let room = tun_rs::IDEAL_BATCH_SIZE;
        for i in 0..room {
            let byte = u8::try_from(i % 256).unwrap_or_default();
            assert!(batch.push(&[byte; 20]).is_ok(), "packet {i} of {room}");
        }
        assert!(!batch.has_room());
        assert_eq!(batch.push(&[0xee; 20]), Err(BatchFull));
        // The refused packet is not in the batch; those before it are,
        // whole and in order.
        let taken: Vec<Vec<u8>> = batch
            .take()
            .iter()
            .map(|b| b[VNET_HDR..].to_vec())
            .collect();
        assert_eq!(taken.len(), room);
        assert!(taken.iter().all(|p| !p.contains(&0xee)));
        assert_eq!(
            taken[room - 1],
            vec![u8::try_from((room - 1) % 256).unwrap_or_default(); 20]
        );
        // Written (taken), the batch has room for it again.
        assert!(batch.is_empty());
        let again = batch.push(&[0xee; 20]).map(|p| p.to_vec());
        assert_eq!(again, Ok(vec![0xee; 20]));
        assert_eq!(batch.len(), 1);
    }
}
