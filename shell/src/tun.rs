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
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    headroom: usize,
    filled: usize,
}

impl BatchReader {
    /// A reader of up to `batch` packets per read, each up to `packet_room`
    /// bytes, after `headroom` bytes.
    pub fn new(batch: usize, packet_room: usize, headroom: usize) -> Self {
        let batch = batch.max(1);
        Self {
            original: vec![0u8; ORIGINAL],
            bufs: vec![vec![0u8; headroom + packet_room]; batch],
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
/// segment, so writing never reallocates.
pub struct WriteBatch {
    pool: Vec<bytes::BytesMut>,
    ready: usize,
    gro: tun_rs::GROTable,
}

impl Default for WriteBatch {
    fn default() -> Self {
        Self {
            pool: (0..tun_rs::IDEAL_BATCH_SIZE)
                .map(|_| bytes::BytesMut::with_capacity(ORIGINAL))
                .collect(),
            ready: 0,
            gro: tun_rs::GROTable::default(),
        }
    }
}

impl WriteBatch {
    /// Whether the batch has room for another packet.
    pub fn has_room(&self) -> bool {
        self.ready < self.pool.len()
    }

    /// Adds a copy of `packet`; returns it, to change in place, or
    /// [`BatchFull`] when the batch has no room: write the batch (which
    /// empties it) and push the packet again, or count it as dropped.
    pub fn push(&mut self, packet: &[u8]) -> Result<&mut [u8], BatchFull> {
        let b = self.pool.get_mut(self.ready).ok_or(BatchFull)?;
        b.clear();
        b.resize(VNET_HDR, 0);
        b.extend_from_slice(packet);
        self.ready += 1;
        b.get_mut(VNET_HDR..).ok_or(BatchFull)
    }

    /// Adds a copy of `packet`, first writing the batch to `dev` when it
    /// is full, so no packet is left out. The packet is added even when
    /// that write fails; the error is returned (the packets of the failed
    /// write are lost), along with how many packets that write carried.
    pub async fn push_or_write(
        &mut self,
        dev: &tun_rs::AsyncDevice,
        offload: bool,
        packet: &[u8],
    ) -> Result<(), (std::io::Error, usize)> {
        let mut result = Ok(());
        if !self.has_room() {
            let n = self.len();
            if let Err(e) = self.write(dev, offload).await {
                result = Err((e, n));
            }
        }
        if self.push(packet).is_err() {
            // Only a batch of no buffers at all is full right after a
            // write; `Default` makes none such.
            return Err((std::io::Error::other("the write batch has no buffers"), 1));
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;

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
