//! Lengths as LEB128: seven bits a byte, low first, the high bit set on all but the last.
//! A length below 128 takes one byte. Used by hot segments' records and by payloads
//! stored by shape.

/// Bytes `len` takes.
pub fn len_bytes(mut len: usize) -> usize {
    let mut bytes = 1;
    while len >= 0x80 {
        len >>= 7;
        bytes += 1;
    }
    bytes
}

/// Appends `len`.
pub fn push(out: &mut Vec<u8>, mut len: usize) {
    while len >= 0x80 {
        out.push((len as u8) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
}

/// Reads a length at `*at`, moving `*at` past it; `None` if the bytes end first or it
/// does not fit a `usize`.
#[inline]
pub fn read(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        len |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(len);
        }
        shift += 7;
        if shift >= usize::BITS {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_and_truncations_are_refused() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, usize::MAX] {
            let mut out = Vec::new();
            push(&mut out, len);
            assert_eq!(out.len(), len_bytes(len), "{len}");
            let mut at = 0;
            assert_eq!(read(&out, &mut at), Some(len));
            assert_eq!(at, out.len());
            let mut at = 0;
            assert_eq!(read(&out[..out.len() - 1], &mut at), None, "{len} cut");
        }
        let mut at = 0;
        assert_eq!(read(&[0xff; 11], &mut at), None, "too long for a usize");
    }
}
