//! permessage-deflate (RFC 7692) on `/subscribe`: negotiated in the handshake, batch frames
//! compressed once for every subscriber, client messages inflated within the request limit.
//!
//! Fan-out in mode `all` is bound by bytes: the kernel copies every frame into every
//! subscriber's socket, and the client copies it out again. A batch of vwap items compresses to
//! about a quarter at [`LEVEL`] 2, so compressing costs one pass over the items per batch and
//! saves three quarters of the copies for every subscriber (BENCHMARKS.md has the fan-out).
//!
//! **Serialize once, compress once.** Both sides agree on no context takeover, so each message
//! is one raw DEFLATE stream of its own. Such a stream may be cut into pieces that end on a byte
//! boundary (a sync flush), and no piece refers back past its own start. So a batch frame is
//! built from parts, none of them recompressed per subscriber:
//! - the subscriber's own head (`{"type":"batch",…,"items":[`, with its `seq`) in a stored block;
//! - each batch's elements, compressed once ([`Compressed`]) and shared by every subscriber that
//!   negotiated the extension;
//! - `,` between merged batches and the closing `]}` in stored blocks;
//! - the first byte of an empty stored block, whose other four bytes (`00 00 ff ff`) the RFC has
//!   the sender leave out and the receiver put back.
//!
//! Other messages (control answers, replays, mode `latest`) go out uncompressed, which the RFC
//! allows per message (the RSV1 bit says which).

use std::cell::RefCell;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` answer of a connection that takes the extension.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What the RFC has the receiver append to a message before inflating it.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether one of the offers in a `Sec-WebSocket-Extensions` header (several headers joined
/// with `,`) is a permessage-deflate this server can take: any `client_max_window_bits` (each
/// message is inflated with a full window), a `server_max_window_bits` of 15 or none (the shared
/// pieces are compressed once, with a full window), and the no-context-takeover flags. An offer
/// with another parameter, a repeated one or a bad value is declined, as the RFC asks; the next
/// offer is tried.
pub fn accepts(header: &str) -> bool {
    header.split(',').any(|offer| {
        let mut params = offer.split(';').map(str::trim);
        if !params
            .next()
            .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
        {
            return false;
        }
        let mut seen: Vec<&str> = Vec::new();
        params.all(|param| {
            let (name, value) = match param.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (param, None),
            };
            if seen.contains(&name) {
                return false;
            }
            seen.push(name);
            let bits = |v: &str| {
                !v.starts_with('0') && v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b))
            };
            match (name, value) {
                ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
                ("client_max_window_bits", None) => true,
                ("client_max_window_bits", Some(v)) => bits(v),
                ("server_max_window_bits", Some(v)) => v == "15",
                _ => false,
            }
        })
    })
}

/// A JSON array's elements, compressed once on first use and shared by every subscriber that
/// negotiated the extension.
#[derive(Default)]
pub struct Compressed(OnceLock<Bytes>);

impl Compressed {
    /// Whether the piece has been made.
    pub fn is_done(&self) -> bool {
        self.0.get().is_some()
    }

    /// The elements of `array` (brackets left out) as a compressed piece of a message (see the
    /// module docs); empty for an empty array. Made at [`LEVEL`] unless already made.
    pub fn get(&self, array: &[u8]) -> &Bytes {
        self.get_for(array, 1)
    }

    /// [`Compressed::get`], made for `sharers` subscribers: at [`WIDE_LEVEL`] when there are
    /// at least [`WIDE`] of them, who all pay for every byte.
    pub fn get_for(&self, array: &[u8], sharers: usize) -> &Bytes {
        self.0.get_or_init(|| {
            let elements = array.get(1..array.len().saturating_sub(1)).unwrap_or(&[]);
            if elements.is_empty() {
                Bytes::new()
            } else if sharers >= WIDE {
                Bytes::from(compress_at(elements, Level::Wide))
            } else {
                Bytes::from(compress(elements))
            }
        })
    }
}

/// The compression level of batch pieces. Level 1 codes with fixed Huffman tables only: a vwap
/// batch comes to about a third of its size (digits take 8 bits each). Level 2 builds tables
/// per block: about 0.23, at about 60% of level 1's speed (zlib-rs, 50-item vwap batches:
/// 343 against 195 MB/s of input). A batch is compressed once and sent to every subscriber,
/// so the bytes matter more; levels 4 to 6 save another 4-8% of them for 25-30% less speed.
const LEVEL: u32 = 2;

/// The level of a piece shared by [`WIDE`] subscribers or more. A 200-item vwap batch at level 6
/// is 10% smaller than at 2 (ratio 5.4 against 4.8) for half the speed (88 against 164 MB/s of
/// input, zlib-rs): compressing is paid once per batch and the bytes once per subscriber, so
/// from a handful of subscribers on the smaller piece costs less in all.
const WIDE_LEVEL: u32 = 6;

/// Subscribers sharing a piece from which it is compressed at [`WIDE_LEVEL`].
pub const WIDE: usize = 8;

#[derive(Clone, Copy)]
enum Level {
    Default,
    Wide,
}

thread_local! {
    /// One compressor per level and one decompressor per thread, reset between uses (setting
    /// one up allocates its tables and window, which cost more than inflating a batch's head).
    static COMPRESS: [RefCell<Compress>; 2] = [
        RefCell::new(Compress::new(Compression::new(LEVEL), false)),
        RefCell::new(Compress::new(Compression::new(WIDE_LEVEL), false)),
    ];
    static DECOMPRESS: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// `data` as raw DEFLATE blocks ending in a sync flush (byte-aligned, not final).
pub fn compress(data: &[u8]) -> Vec<u8> {
    compress_at(data, Level::Default)
}

fn compress_at(data: &[u8], level: Level) -> Vec<u8> {
    COMPRESS.with(|c| {
        let mut c = c[level as usize].borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(data.len() / 3 + 64);
        loop {
            let consumed = c.total_in() as usize;
            match c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync) {
                Ok(_) if c.total_in() as usize == data.len() && out.len() < out.capacity() => break,
                Ok(_) => out.reserve(out.capacity().max(64)),
                Err(e) => unreachable!("deflate of a buffer in memory failed: {e}"),
            }
        }
        out
    })
}

/// Appends `data` as stored (uncompressed) blocks to `out`, which ends on a byte boundary.
pub fn stored(out: &mut Vec<u8>, data: &[u8]) {
    for chunk in data.chunks(usize::from(u16::MAX)) {
        let len = chunk.len() as u16;
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

/// `,` as a stored block, between the pieces of merged batches.
pub const COMMA: &[u8] = &[0x00, 0x01, 0x00, 0xfe, 0xff, b','];
/// `]}` as a stored block, then the end of the message: the first byte of an empty stored block
/// (see the module docs).
pub const CLOSE: &[u8] = &[0x00, 0x02, 0x00, 0xfd, 0xff, b']', b'}', 0x00];

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooBig,
    /// It is not valid DEFLATE data.
    Invalid,
}

/// Inflates one message (its payload as received, without the tail the RFC has the receiver
/// append) to at most `limit` bytes. A message that would inflate further stops at the limit:
/// a small frame cannot make the server allocate more than the limit.
pub fn inflate(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        inflate_with(&mut d, payload, limit)
    })
}

fn inflate_with(d: &mut Decompress, payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    // Room for one byte past the limit tells a message at the limit from one beyond it.
    let mut out = Vec::with_capacity((payload.len() * 4).max(256).min(limit + 1));
    for input in [payload, &TAIL[..]] {
        let mut read = 0;
        loop {
            if out.len() == out.capacity() {
                let room = (limit + 1).saturating_sub(out.len());
                if room == 0 {
                    return Err(InflateError::TooBig);
                }
                out.reserve_exact(out.capacity().max(256).min(room));
            }
            let before = d.total_in();
            let status = d
                .decompress_vec(&input[read..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            read += (d.total_in() - before) as usize;
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            match status {
                Status::StreamEnd if read < input.len() => return Err(InflateError::Invalid),
                Status::StreamEnd => return Ok(out),
                _ if read == input.len() && out.len() < out.capacity() => break,
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The data of the stored (uncompressed) block a compressed message starts with, if it starts
/// with one that is not its last: eddy's batch frames carry their head that way (see the module
/// docs), so a client can read it without inflating anything.
pub fn leading_stored(payload: &[u8]) -> Option<&[u8]> {
    let (&first, rest) = payload.split_first()?;
    // BFINAL 0, BTYPE 00; the other bits of the byte are padding.
    if first & 0b111 != 0 || rest.len() < 4 {
        return None;
    }
    let len = u16::from_le_bytes([rest[0], rest[1]]);
    let nlen = u16::from_le_bytes([rest[2], rest[3]]);
    if len != !nlen {
        return None;
    }
    rest[4..].get(..usize::from(len))
}

/// The first bytes of a compressed message, at most `n` of them, inflating no more than that:
/// what a client that only looks at a frame's head needs (see `eddy probe`).
pub fn inflate_prefix(payload: &[u8], n: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out = Vec::with_capacity(n);
        d.decompress_vec(payload, &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Inflates a whole message the way any client does (flate2's reader, tail appended).
    fn plain_inflate(message: &[u8]) -> Vec<u8> {
        let mut input = message.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::new();
        let mut reader = flate2::read::DeflateDecoder::new(&input[..]);
        // The stream has no final block: read until the input runs out.
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        out
    }

    #[test]
    fn offers_are_taken_or_declined_as_the_rfc_says() {
        assert!(accepts("permessage-deflate"));
        assert!(accepts("permessage-deflate; client_max_window_bits"));
        assert!(accepts(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
        ));
        assert!(accepts("x-webkit-deflate-frame, permessage-deflate"));
        assert!(accepts(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(accepts("permessage-deflate; server_max_window_bits=15"));
        assert!(!accepts("permessage-deflate; server_max_window_bits=10"));
        assert!(!accepts("permessage-deflate; client_max_window_bits=7"));
        assert!(!accepts("permessage-deflate; client_max_window_bits=010"));
        assert!(!accepts("permessage-deflate; unknown_param"));
        assert!(!accepts(
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ));
        assert!(!accepts("permessage-deflate; server_no_context_takeover=1"));
        assert!(!accepts("deflate-frame"));
        assert!(!accepts(""));
    }

    #[test]
    fn a_frame_built_from_pieces_inflates_to_the_whole_json() {
        let a = br#"[{"key":"AAPL","value":{"vwap":187.25,"volume":300}},{"key":"MSFT","value":{"vwap":411.5,"volume":120}}]"#;
        let b = br#"[{"key":"AAPL","value":{"vwap":187.5,"volume":400}}]"#;
        let head = br#"{"type":"batch","topic":"vwap","seq":7,"n":3,"items":["#;
        let (ca, cb) = (Compressed::default(), Compressed::default());
        let mut message = Vec::new();
        stored(&mut message, head);
        message.extend_from_slice(ca.get(a));
        message.extend_from_slice(COMMA);
        message.extend_from_slice(cb.get(b));
        message.extend_from_slice(CLOSE);
        let text = plain_inflate(&message);
        let expected = format!(
            "{}{},{}]}}",
            std::str::from_utf8(head).unwrap(),
            std::str::from_utf8(&a[1..a.len() - 1]).unwrap(),
            std::str::from_utf8(&b[1..b.len() - 1]).unwrap()
        );
        assert_eq!(String::from_utf8(text).unwrap(), expected);
        // Our own inflater agrees, and the piece is cached: the second call compresses nothing.
        assert_eq!(inflate(&message, 1 << 20).unwrap(), expected.as_bytes());
        assert!(std::ptr::eq(ca.get(a), ca.get(b"[]")));
        assert!(Compressed::default().get(b"[]").is_empty());
        // The head can be read with a prefix of the inflation.
        let prefix = inflate_prefix(&message, 40).unwrap();
        assert_eq!(&prefix[..], &expected.as_bytes()[..40]);
    }

    /// A batch of 50 vwap items as the shard encodes them, with prices and times that vary the
    /// way a market's do (a plain linear congruential generator, not the engine's).
    fn vwap_batch() -> Vec<u8> {
        let mut x: u64 = 12345;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        let items: Vec<String> = (0..50)
            .map(|i| {
                let (volume, trades) = (100 * (1 + next(5000)), 1 + next(900));
                let notional = (volume * (10_000 + next(90_000))) as f64 / 100.0;
                format!(
                    r#"{{"key":"S{:02}","value":{{"last":{}.{:02},"sent_us":{},"trades":{},"ts":{},"volume":{},"vwap":{}}}}}"#,
                    next(50),
                    100 + next(400),
                    next(100),
                    1_796_072_525_000_000 + 20 * i + next(20),
                    trades,
                    1_700_000_000_000 + 100 * i + next(100),
                    volume,
                    notional / (volume + trades) as f64
                )
            })
            .collect();
        format!("[{}]", items.join(",")).into_bytes()
    }

    #[test]
    fn a_vwap_batch_compresses_to_under_three_tenths() {
        // About a quarter; the fastest level (fixed Huffman codes only) leaves over a third,
        // digits costing 8 bits each. Fan-out pays for every byte once per subscriber, and for
        // the compression once.
        let array = vwap_batch();
        let piece = Compressed::default().get(&array).clone();
        assert!(
            piece.len() * 10 < array.len() * 3,
            "{} of {} bytes",
            piece.len(),
            array.len()
        );
        let mut fastest = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(array.len());
        fastest
            .compress_vec(&array[1..array.len() - 1], &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(
            out.len() > piece.len() * 5 / 4,
            "{} against {}",
            out.len(),
            piece.len()
        );
        // And it inflates back to the elements.
        assert!(plain_inflate(&piece) == array[1..array.len() - 1]);
    }

    #[test]
    fn a_piece_shared_widely_is_compressed_harder_and_inflates_the_same() {
        let array = vwap_batch();
        let elements = &array[1..array.len() - 1];
        let narrow = Compressed::default().get_for(&array, WIDE - 1).clone();
        let wide = Compressed::default().get_for(&array, WIDE).clone();
        assert_eq!(narrow, Compressed::default().get(&array).clone());
        assert!(
            wide.len() < narrow.len(),
            "{} against {}",
            wide.len(),
            narrow.len()
        );
        assert!(plain_inflate(&wide) == elements);
        // Made once: the first caller's level holds for every later one.
        let once = Compressed::default();
        let first = once.get_for(&array, WIDE).clone();
        assert_eq!(once.get(&array), &first);
    }

    #[test]
    fn a_leading_stored_block_is_read_without_inflating_and_anything_else_is_not() {
        let mut message = Vec::new();
        stored(&mut message, b"{\"type\":\"batch\",\"n\":2,\"items\":");
        stored(&mut message, b"[");
        message.extend_from_slice(&compress(b"1,2"));
        message.extend_from_slice(CLOSE);
        assert_eq!(
            leading_stored(&message),
            Some(&b"{\"type\":\"batch\",\"n\":2,\"items\":"[..])
        );
        assert_eq!(
            plain_inflate(&message),
            b"{\"type\":\"batch\",\"n\":2,\"items\":[1,2]}"
        );
        // Compressed first, a final block, a length that disagrees with its complement, or
        // one longer than the message: no head.
        assert_eq!(leading_stored(&compress(b"{\"type\":\"batch\"}")), None);
        assert_eq!(leading_stored(&[0x01, 0x01, 0x00, 0xfe, 0xff, b'x']), None);
        assert_eq!(leading_stored(&[0x00, 0x01, 0x00, 0xfd, 0xff, b'x']), None);
        assert_eq!(leading_stored(&[0x00, 0x05, 0x00, 0xfa, 0xff, b'x']), None);
        assert_eq!(leading_stored(&[0x00]), None);
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_limit_and_garbage_is_refused() {
        // A megabyte of zeros compresses to about 10 KB at the fastest level.
        let bomb = compress(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 64 * 1024), Err(InflateError::TooBig));
        assert_eq!(inflate(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0x00, 0x13], 1 << 20),
            Err(InflateError::Invalid)
        );
        // A whole message made by another compressor (flate2's writer) inflates too.
        let mut w = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        std::io::Write::write_all(&mut w, b"{\"op\":\"topics\"}").unwrap();
        let full = w.finish().unwrap();
        assert_eq!(inflate(&full, 100).unwrap(), b"{\"op\":\"topics\"}");
    }
}
