//! Is this request for Knocker? This runs on every request, so it must stay cheap.
//!
//! Envoy hands the header map over as one serialized buffer (proxy-wasm ABI):
//! `u32 count`, then `count` pairs of `u32 name_len, u32 value_len`, then each name and
//! value followed by a NUL byte. [`serialized_has_knocker_header`] scans it in place:
//! no allocation, no UTF-8 decoding.

/// The prefix of every Knocker header (Envoy lower-cases header names).
pub const KNOCKER_PREFIX: &[u8] = b"knocker-";

/// True when the name starts with `knocker-`, in any case.
pub fn is_knocker_header(name: &[u8]) -> bool {
    name.get(..KNOCKER_PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(KNOCKER_PREFIX))
}

fn read_u32(buf: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// Scans a serialized header map for a `knocker-*` name. A malformed buffer counts as
/// "no" (the request passes through untouched), never as a panic.
pub fn serialized_has_knocker_header(buf: &[u8]) -> bool {
    let Some(count) = read_u32(buf, 0) else {
        return false;
    };
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return false;
    };
    for i in 0..count {
        let sizes = 4 + i * 8; // cannot overflow: 4 + count * 8 was checked above
        let (Some(name_len), Some(value_len)) = (read_u32(buf, sizes), read_u32(buf, sizes + 4))
        else {
            return false;
        };
        let Some(name) = data
            .checked_add(name_len)
            .and_then(|end| buf.get(data..end))
        else {
            return false;
        };
        if is_knocker_header(name) {
            return true;
        }
        let next = name_len
            .checked_add(value_len)
            .and_then(|n| n.checked_add(2))
            .and_then(|n| data.checked_add(n));
        data = match next {
            Some(next) => next,
            None => return false,
        };
    }
    false
}

/// The same decision on an already deserialized map: the copy a request with rules
/// configured is matched on (and the fake host in tests).
pub fn has_knocker_header<N: AsRef<[u8]>, V>(headers: &[(N, V)]) -> bool {
    headers
        .iter()
        .any(|(name, _)| is_knocker_header(name.as_ref()))
}

#[cfg(test)]
pub(crate) fn serialize(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (n, v) in headers {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_in_any_case() {
        assert!(is_knocker_header(b"knocker-host"));
        assert!(is_knocker_header(b"Knocker-Retries"));
        assert!(!is_knocker_header(b"knocker"));
        assert!(!is_knocker_header(b"x-knocker"));
        assert!(!is_knocker_header(b""));
    }

    #[test]
    fn scans_serialized_maps() {
        let plain = serialize(&[(":method", "GET"), (":path", "/"), ("accept", "*/*")]);
        assert!(!serialized_has_knocker_header(&plain));
        let knock = serialize(&[(":method", "GET"), ("accept", "*/*"), ("knocker-host", "a")]);
        assert!(serialized_has_knocker_header(&knock));
        let only_value = serialize(&[("x", "knocker-host")]);
        assert!(!serialized_has_knocker_header(&only_value));
        assert!(!serialized_has_knocker_header(&serialize(&[])));
    }

    #[test]
    fn malformed_buffers_are_not_knocker() {
        assert!(!serialized_has_knocker_header(b""));
        assert!(!serialized_has_knocker_header(&[1, 0, 0]));
        assert!(!serialized_has_knocker_header(&[0xff, 0xff, 0xff, 0xff]));
        let mut truncated = serialize(&[("accept", "x"), ("knocker-host", "a")]);
        truncated.truncate(24);
        assert!(!serialized_has_knocker_header(&truncated));
    }

    #[test]
    fn deserialized_maps() {
        assert!(has_knocker_header(&[("Knocker-Host", "a")]));
        assert!(!has_knocker_header::<&str, &str>(&[]));
    }
}
