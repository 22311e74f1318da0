//! Compact JSON encoding of what scripts emit: Rhai values, events and plugin objects.
//!
//! Emitted values are encoded once, on the shard that produced them, straight into bytes; from
//! there on (batching, fan-out, `eddy run` output) they are only copied, never re-encoded.
//! Maps come out with their keys sorted (Rhai maps are ordered), so output is deterministic.
//! Non-finite floats become `null`, as JSON has no spelling for them.

use rhai::Dynamic;

use crate::event::Event;

/// How deep nested arrays and maps may go before encoding stops with an error.
pub const MAX_DEPTH: usize = 64;

/// An emitted value that cannot be written as JSON.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("value is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("encoded value is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

/// `00`, `01`, … `99`: two digits at a time.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// Writes an integer in decimal, as `itoa` does (a test holds the two to each other), straight
/// into `out`: its length is known first (`ilog10`), so the digits go to their place two at a
/// time, with no buffer to copy from.
#[inline]
pub fn write_int(out: &mut Vec<u8>, n: i64) {
    let mut v = n.unsigned_abs();
    let digits = v.checked_ilog10().map_or(1, |l| l as usize + 1);
    let len = digits + usize::from(n < 0);
    out.reserve(len);
    let start = out.len();
    // SAFETY: `len` bytes are reserved after `start`. The digits fill them from the end, two
    // (then one or two) at a time, down to `base + (n < 0)` exactly, as `digits` counts them;
    // the sign fills the first. All `len` are written before `set_len`.
    unsafe {
        let base = out.as_mut_ptr().add(start);
        let mut end = base.add(len);
        while v >= 100 {
            let pair = (v % 100) as usize * 2;
            v /= 100;
            end = end.sub(2);
            std::ptr::copy_nonoverlapping(DIGIT_PAIRS.as_ptr().add(pair), end, 2);
        }
        if v >= 10 {
            end = end.sub(2);
            std::ptr::copy_nonoverlapping(DIGIT_PAIRS.as_ptr().add(v as usize * 2), end, 2);
        } else {
            end = end.sub(1);
            end.write(b'0' + v as u8);
        }
        if n < 0 {
            base.write(b'-');
        }
        out.set_len(start + len);
    }
}

/// Appends `s` to `out`. What JSON output mostly appends is a few bytes long (keys, numbers,
/// tickers), and for those `extend_from_slice` calls `memcpy`, which costs more than the copy:
/// up to 32 bytes go in as two overlapping copies of a fixed size, which compile to a few moves.
#[inline(always)]
pub fn put(out: &mut Vec<u8>, s: &[u8]) {
    // Two copies of `W` bytes, at the start and at the end of `s` (they overlap when
    // `s.len() < 2 * W`), appended as one block of `2 * W` bytes cut back to `s.len()`.
    macro_rules! overlapping {
        ($w:literal) => {{
            let (n, len) = (s.len(), out.len());
            let mut block = [0u8; 2 * $w];
            block[..$w].copy_from_slice(&s[..$w]);
            block[n - $w..n].copy_from_slice(&s[n - $w..]);
            out.extend_from_slice(&block);
            out.truncate(len + n);
        }};
    }
    match s.len() {
        0..=3 => s.iter().for_each(|&b| out.push(b)),
        4..=7 => overlapping!(4),
        8..=15 => overlapping!(8),
        16..=32 => overlapping!(16),
        _ => out.extend_from_slice(s),
    }
}

/// Writes a float as the shortest decimal that reads back as it (`1.0`, `187.3`, `0.001`,
/// `1e21`, `1e-7`), `null` if not finite.
///
/// The digits are zmij's (Schubfach: shortest, correctly rounded), the same as ryu's, which
/// wrote them before; zmij takes about 200 instructions where ryu took about 450. The layout
/// is ryu's too: zmij writes a positive exponent as `e+21`, so its `+` is taken out. A test
/// compares the two on decimals of every length and scale and on random bit patterns.
pub fn write_float(out: &mut Vec<u8>, x: f64) {
    if !x.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    let mut buf = zmij::Buffer::new();
    let text = buf.format_finite(x).as_bytes();
    // Between 1e-4 and 1e15 the shortest decimal has no exponent (zmij writes one from 1e16 and
    // below 1e-5): nothing to look at.
    if (1e-4..1e15).contains(&x.abs()) {
        put(out, text);
        return;
    }
    match text.iter().position(|&b| b == b'+') {
        Some(plus) => {
            out.extend_from_slice(&text[..plus]);
            out.extend_from_slice(&text[plus + 1..]);
        }
        None => out.extend_from_slice(text),
    }
}

/// The bytes a JSON string cannot hold as they are: `"`, `\\` and control characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Writes `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (keys, tickers, topics) need no escape: one copy.
    if !bytes.iter().any(|&b| NEEDS_ESCAPE[b as usize]) {
        put(out, bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes one JSON object field by field. Every message the server writes (WebSocket frames,
/// HTTP answers) is built with it, so escaping and punctuation live in one place; values that
/// are already JSON (emitted items, batches) go in with [`Object::raw`], uncopied.
///
/// ```
/// let mut out = Vec::new();
/// eddy::json::Object::new(&mut out).str("type", "error").int("frame", 3).end();
/// assert_eq!(out, br#"{"type":"error","frame":3}"#);
/// ```
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// Writes `key` and its colon; the caller writes the value to the returned buffer.
    pub fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        write_str(self.out, key);
        self.out.push(b':');
        self.out
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        write_str(self.key(key), value);
        self
    }

    /// A string, or `null` for `None`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.raw(key, b"null"),
        }
    }

    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        write_int(self.key(key), value);
        self
    }

    /// A number (`null` if not finite).
    pub fn float(&mut self, key: &str, value: f64) -> &mut Self {
        write_float(self.key(key), value);
        self
    }

    /// A value that is already JSON.
    pub fn raw(&mut self, key: &str, json: &[u8]) -> &mut Self {
        self.key(key).extend_from_slice(json);
        self
    }

    /// An array of `items`, each written by `write`.
    pub fn array<T>(
        &mut self,
        key: &str,
        items: impl IntoIterator<Item = T>,
        mut write: impl FnMut(&mut Vec<u8>, T),
    ) -> &mut Self {
        let out = self.key(key);
        out.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write(out, item);
        }
        out.push(b']');
        self
    }

    /// Closes the object.
    pub fn end(&mut self) {
        self.out.push(b'}');
    }
}

/// `{"type":KIND,…}`: a message of the WebSocket protocol, its other fields written by `fields`.
pub fn message(kind: &str, fields: impl FnOnce(&mut Object<'_>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut object = Object::new(&mut out);
    object.str("type", kind);
    fields(&mut object);
    object.end();
    out
}

/// Writes a Rhai value as compact JSON, failing past `limit` bytes of output.
pub fn write_dynamic(out: &mut Vec<u8>, value: &Dynamic, limit: usize) -> Result<(), EncodeError> {
    let start = out.len();
    write_value(out, value, 0)?;
    if out.len() - start > limit {
        out.truncate(start);
        return Err(EncodeError::TooLarge { limit });
    }
    Ok(())
}

fn write_value(out: &mut Vec<u8>, value: &Dynamic, depth: usize) -> Result<(), EncodeError> {
    if depth > MAX_DEPTH {
        return Err(EncodeError::TooDeep);
    }
    // (`is_*` before `as_*`: a failed `as_*` names the value's type, which costs more.)
    if value.is_float() {
        write_float(out, value.as_float().expect("a float"));
    } else if value.is_int() {
        write_int(out, value.as_int().expect("an int"));
    } else if value.is_unit() {
        out.extend_from_slice(b"null");
    } else if let Ok(b) = value.as_bool() {
        out.extend_from_slice(if b { b"true" } else { b"false" });
    } else if let Ok(s) = value.as_immutable_string_ref() {
        write_str(out, &s);
    } else if let Ok(c) = value.as_char() {
        write_str(out, c.encode_utf8(&mut [0; 4]));
    } else if value.is_map() {
        let map = value.as_map_ref().expect("checked is_map");
        write_map(out, &map, depth)?;
    } else if value.is_array() {
        let array = value.as_array_ref().expect("checked is_array");
        out.push(b'[');
        for (i, item) in array.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_value(out, item, depth + 1)?;
        }
        out.push(b']');
    } else if value.is_blob() {
        let blob = value.as_blob_ref().expect("checked is_blob");
        out.push(b'[');
        for (i, byte) in blob.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_int(out, i64::from(*byte));
        }
        out.push(b']');
    } else if let Some(event) = value.read_lock::<Event>() {
        event.write_json(out);
    } else if let Some(summary) = eddy_plugins::summary(value) {
        write_map(out, &summary, depth)?;
    } else if value.is_fnptr() {
        let f = value.clone().cast::<rhai::FnPtr>();
        write_str(out, f.fn_name());
    } else {
        write_str(out, value.type_name());
    }
    Ok(())
}

/// Writes a map given as its entries in key order, each key already written as `"key":`,
/// exactly as [`write_dynamic`] writes a `rhai::Map` holding them, failing past `limit` bytes
/// of output.
pub fn write_encoded_entries<'a>(
    out: &mut Vec<u8>,
    entries: impl Iterator<Item = (&'a [u8], &'a Dynamic)>,
    limit: usize,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.push(b'{');
    for (i, (key, item)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        put(out, key);
        // Numbers, what records mostly hold, in line (as `write_value` writes them).
        if item.is_float() {
            write_float(out, item.as_float().expect("a float"));
        } else if item.is_int() {
            write_int(out, item.as_int().expect("an int"));
        } else {
            write_value(out, item, 1)?;
        }
    }
    out.push(b'}');
    if out.len() - start > limit {
        out.truncate(start);
        return Err(EncodeError::TooLarge { limit });
    }
    Ok(())
}

fn write_map(out: &mut Vec<u8>, map: &rhai::Map, depth: usize) -> Result<(), EncodeError> {
    out.push(b'{');
    for (i, (name, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        write_value(out, item, depth + 1)?;
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(script: &str) -> String {
        let engine = rhai::Engine::new();
        let value: Dynamic = engine.eval(script).unwrap();
        let mut out = Vec::new();
        write_dynamic(&mut out, &value, usize::MAX).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// `write_int` writes what `itoa` writes: every power of ten and its neighbours, both
    /// signs, the extremes, and pseudo-random values of every length, after other bytes.
    #[test]
    fn write_int_writes_what_itoa_writes() {
        let mut values = vec![0, 1, -1, 9, 10, 99, 100, i64::MAX, i64::MIN, i64::MIN + 1];
        let mut p: i64 = 1;
        while let Some(next) = p.checked_mul(10) {
            for v in [p - 1, p, p + 1, next - 1] {
                values.extend([v, -v]);
            }
            p = next;
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push((x >> (x % 64)) as i64);
            values.push(x as i64);
        }
        for v in values {
            let mut out = b"ab".to_vec();
            write_int(&mut out, v);
            let want = format!("ab{}", itoa::Buffer::new().format(v));
            assert_eq!(String::from_utf8(out).unwrap(), want, "{v}");
        }
    }

    #[test]
    fn put_appends_like_extend_from_slice() {
        let source: Vec<u8> = (0..80u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(11))
            .collect();
        for prefix in [0, 1, 5, 13, 100] {
            for n in 0..=source.len() {
                for start in [0, 3] {
                    let s = &source[start..(start + n).min(source.len())];
                    let mut want: Vec<u8> = source[..prefix.min(source.len())].to_vec();
                    let mut got = want.clone();
                    want.extend_from_slice(s);
                    put(&mut got, s);
                    assert_eq!(got, want, "prefix {prefix}, {} bytes", s.len());
                }
            }
        }
    }

    #[test]
    fn values_match_serde_json() {
        let text = encode(r#"#{b: [1, 2.5, true, ()], a: "q\"\n\u0001", c: 'x', d: -0.0}"#);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected =
            serde_json::json!({"a": "q\"\n\u{1}", "b": [1, 2.5, true, null], "c": "x", "d": -0.0});
        assert_eq!(parsed, expected);
        // keys come out sorted
        assert!(text.starts_with(r#"{"a":"#));
    }

    #[test]
    fn every_ascii_character_reads_back_from_a_written_string() {
        for c in (0u8..128).map(char::from) {
            let s = format!("a{c}b{c}");
            let mut out = Vec::new();
            write_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s, "{c:?}");
        }
        let mut out = Vec::new();
        write_str(&mut out, "plain é");
        assert_eq!(out, "\"plain é\"".as_bytes());
    }

    #[test]
    fn floats_keep_a_fraction_and_non_finite_is_null() {
        assert_eq!(encode("1.0"), "1.0");
        assert_eq!(encode("[1.0/0.0, 0.0/0.0]"), "[null,null]");
    }

    fn ryu_text(x: f64) -> String {
        ryu::Buffer::new().format_finite(x).to_owned()
    }

    fn float_text(x: f64) -> String {
        let mut out = Vec::new();
        write_float(&mut out, x);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_by_hand() {
        for (x, text) in [
            (187.3, "187.3"),
            (-2.5, "-2.5"),
            (3.0, "3.0"),
            (0.001, "0.001"),
            (0.00012, "0.00012"),
            (100.0, "100.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123456789012345.0, "123456789012345.0"),
            (99999.99, "99999.99"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e16"),
            (0.00001, "0.00001"),
            (0.000001, "1e-6"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
        ] {
            assert_eq!(float_text(x), text, "{x:?}");
        }
    }

    /// The text is exactly what ryu (the formatter before zmij) writes, over decimals of every
    /// length from 1 to 17 digits at every scale, their neighbours, powers of ten at the edges
    /// of the exponent form, and random bit patterns.
    #[test]
    fn floats_are_ryus_text() {
        let mut rng = fastrand::Rng::with_seed(8);
        let mut exponents = 0;
        let mut check = |x: f64| {
            if !x.is_finite() {
                return;
            }
            for x in [
                x,
                -x,
                f64::from_bits(x.to_bits().wrapping_add(1)),
                f64::from_bits(x.to_bits().wrapping_sub(1)),
            ] {
                if !x.is_finite() {
                    continue;
                }
                let text = float_text(x);
                exponents += usize::from(text.contains('e'));
                assert_eq!(text, ryu_text(x), "{:#x}", x.to_bits());
            }
        };
        for digits in 1..=17u32 {
            for scale in -30..=30i32 {
                for _ in 0..40 {
                    let n = rng.u64(10u64.pow(digits - 1)..10u64.pow(digits));
                    let x: f64 = format!("{n}e{scale}").parse().unwrap();
                    check(x);
                }
            }
        }
        for e in -8..=18 {
            check(10f64.powi(e));
            check(format!("1e{e}").parse().unwrap());
            check(format!("9.99999999999999e{e}").parse().unwrap());
            check(format!("9.999999999999999e{e}").parse().unwrap());
        }
        for x in [f64::MAX, f64::MIN_POSITIVE, 5e-324, 1e308, 1e-308] {
            check(x);
        }
        for _ in 0..200_000 {
            check(f64::from_bits(rng.u64(..)));
            // Doubles of ordinary sizes.
            check(f64::from_bits(
                rng.u64(0x3f00_0000_0000_0000..0x4330_0000_0000_0000),
            ));
        }
        assert!(
            exponents > 50_000,
            "the exponent form came {exponents} times"
        );
    }

    #[test]
    fn too_deep_and_too_large_are_errors() {
        let engine = rhai::Engine::new();
        let mut deep = Dynamic::UNIT;
        for _ in 0..=MAX_DEPTH + 1 {
            deep = Dynamic::from_array(vec![deep]);
        }
        let mut out = Vec::new();
        assert_eq!(
            write_dynamic(&mut out, &deep, 1 << 20),
            Err(EncodeError::TooDeep)
        );
        let big: Dynamic = engine
            .eval(r#"let s = ""; for i in 0..100 { s += "y" } s"#)
            .unwrap();
        out.clear();
        let err = write_dynamic(&mut out, &big, 10).unwrap_err();
        assert_eq!(err, EncodeError::TooLarge { limit: 10 });
        assert!(out.is_empty());
    }
}
