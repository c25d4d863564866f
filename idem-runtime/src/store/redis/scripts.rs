//! The Lua scripts, one per verb, and the record's value.
//!
//! A record is one Redis string, its lease and expiry the key's own TTL: the key expires its
//! retention after the lease (in progress) or the result (completed) runs out, and that
//! retention is in the value, so the time left is `PTTL` minus the retention (the server's
//! clock, whatever the replicas' clocks say): a takeover compares the two in its script, a
//! load reads both and [`record`] subtracts. The value:
//!
//! ```text
//! i<fence>|<retention ms>|<attempts>|<owner length>|<fingerprint length>|<owner><fingerprint>
//! c<fence>|<retention ms>|<attempts>|<owner length>|<fingerprint length>|<owner><fingerprint><codec>|<result>
//! ```
//!
//! so a script checks the state and fence by comparing a prefix, and a finalize appends the
//! result to the reservation as it stands. A reservation is one `SET NX PX` inside its
//! script; a result one `GET` and one `SET PX`.

use std::time::Duration;

use redis::Script;

use crate::codec::Codec;
use crate::error::StoreError;
use crate::key::Fingerprint;
use crate::store::{Claim, Fence, Record, RecordState, StoredResult};

/// Every script that changes a record takes the caller's own prefix first (ARGV[1]):
/// `i<fence>|<retention ms>|`, as the caller's claim wrote it. A record that starts with it
/// is in progress under the caller's fence; anything else is not the caller's. (One store
/// writes one retention, and every call's verbs go to one store, so the caller's fence comes
/// with the caller's retention.)
///
/// Inserts the value ARGV[2] with a TTL of ARGV[3] ms if the key is absent (1), else returns
/// `{value, ttl}`. A reservation already the caller's own (the client sent the script again
/// after a dropped connection): 1, after writing its first byte again, unchanged, so that a
/// `WAIT` on this connection covers the first write (servers count only a connection's own
/// writes).
const RESERVE: &str = "local k = KEYS[1]
if redis.call('SET', k, ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
local v = redis.call('GET', k)
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SETRANGE', k, 0, 'i')
  return 1
end
return {v, redis.call('PTTL', k)}";

/// The end of a fenced write that found a record not the caller's: if it is in progress
/// under the caller's fence but another retention (two stores with different retentions
/// behind one caller), that is a misconfiguration, said loudly rather than answered as a
/// lost lease.
macro_rules! another_retention {
    () => {
        "local f = string.sub(ARGV[1], 1, string.find(ARGV[1], '|', 2, true))
if string.sub(v, 1, #f) == f then
  return redis.error_reply('idem record written with another retention')
end
"
    };
}

/// The value and its TTL, or nil.
const LOAD: &str = "local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}";

/// ARGV: the caller's prefix with its new fence, the rest of the claim after its attempts,
/// its TTL in ms, and the fence the caller saw. Replaces a record holding the seen fence
/// whose lease (in progress) or result (completed) has run out: 1. A record already the
/// caller's is this takeover, sent again: 1 (after the same unchanged write as in `RESERVE`).
const TAKE_OVER: &str = "local k = KEYS[1]
local v = redis.call('GET', k)
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SETRANGE', k, 0, 'i')
  return 1
end
local seen = ARGV[4] .. '|'
if string.sub(v, 2, #seen + 1) ~= seen then return 0 end
local p = #seen + 2
local q = string.find(v, '|', p, true)
local retention = q and string.match(string.sub(v, p, q - 1), '^%d+$')
if not retention or #retention > 15 then return redis.error_reply('malformed idem record') end
local t = redis.call('PTTL', k)
if t < 0 or t > tonumber(retention) then return 0 end
local attempts = 1
if string.sub(v, 1, 1) == 'i' then
  local r = string.find(v, '|', q + 1, true)
  local old = r and string.match(string.sub(v, q + 1, r - 1), '^%d+$')
  if not old or #old > 9 then return redis.error_reply('malformed idem record') end
  attempts = tonumber(old) + 1
end
redis.call('SET', k, ARGV[1] .. string.format('%d', attempts) .. ARGV[2], 'PX', ARGV[3])
return 1";

/// ARGV: the caller's prefix, the new TTL in ms (the lease plus the retention). Extends a
/// reservation still the caller's.
const HEARTBEAT: &str = concat!(
    "local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
",
    another_retention!(),
    "return 0"
);

/// ARGV: the caller's prefix, the codec and result (`codec|bytes`), the TTL in ms (the
/// result's plus the retention). Refused (0) unless the reservation is still the caller's.
/// Already completed under it (this finalize, sent again), it still writes its first byte
/// again, unchanged, so that a `WAIT` after it covers the earlier write.
const FINALIZE: &str = concat!(
    "local k = KEYS[1]
local v = redis.call('GET', k)
if not v then return 0 end
local head = string.sub(v, 1, #ARGV[1])
if head == ARGV[1] then
  redis.call('SET', k, 'c' .. string.sub(v, 2) .. ARGV[2], 'PX', ARGV[3])
  return 1
end
if head == 'c' .. string.sub(ARGV[1], 2) then
  redis.call('SETRANGE', k, 0, 'c')
  return 0
end
",
    another_retention!(),
    "return 0"
);

/// ARGV: the caller's prefix.
const RELEASE: &str = concat!(
    "local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
",
    another_retention!(),
    "return 0"
);

/// The scripts, with their SHA1s worked out once.
pub(super) struct Scripts {
    pub(super) reserve: Script,
    pub(super) load: Script,
    pub(super) take_over: Script,
    pub(super) heartbeat: Script,
    pub(super) finalize: Script,
    pub(super) release: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            reserve: Script::new(RESERVE),
            load: Script::new(LOAD),
            take_over: Script::new(TAKE_OVER),
            heartbeat: Script::new(HEARTBEAT),
            finalize: Script::new(FINALIZE),
            release: Script::new(RELEASE),
        }
    }
}

/// The prefix of a record in progress under `fence`, written with `retention_ms`:
/// `i<fence>|<retention ms>|`.
pub(super) fn own_prefix(fence: Fence, retention_ms: u64) -> Vec<u8> {
    let mut n = itoa::Buffer::new();
    let mut head = Vec::with_capacity(48);
    head.push(b'i');
    head.extend_from_slice(n.format(fence.get()).as_bytes());
    head.push(b'|');
    head.extend_from_slice(n.format(retention_ms).as_bytes());
    head.push(b'|');
    head
}

/// A claim's value, in two parts around its attempts (which only a takeover works out, on the
/// server): [`own_prefix`] and `|<owner length>|<fingerprint length>|<owner><fingerprint>`.
pub(super) fn claim_value(claim: &Claim<'_>, retention_ms: u64) -> (Vec<u8>, Vec<u8>) {
    let mut n = itoa::Buffer::new();
    let fp: &[u8] = claim.fingerprint.map_or(&[], |f| &f.as_bytes()[..]);
    let mut tail = Vec::with_capacity(16 + claim.owner.len() + fp.len());
    tail.push(b'|');
    tail.extend_from_slice(n.format(claim.owner.len()).as_bytes());
    tail.push(b'|');
    tail.extend_from_slice(n.format(fp.len()).as_bytes());
    tail.push(b'|');
    tail.extend_from_slice(claim.owner.as_bytes());
    tail.extend_from_slice(fp);
    (own_prefix(claim.fence, retention_ms), tail)
}

/// What a finalize appends to the record: `<codec>|<result>`.
pub(super) fn result_value(result: &StoredResult) -> Vec<u8> {
    let codec = result.codec.as_str().as_bytes();
    let mut out = Vec::with_capacity(codec.len() + 1 + result.bytes.len());
    out.extend_from_slice(codec);
    out.push(b'|');
    out.extend_from_slice(&result.bytes);
    out
}

/// A record read back from its value and its key's TTL in ms.
pub(super) fn record(value: &[u8], ttl_ms: i64) -> Result<Record, StoreError> {
    let bad = |what: &str| StoreError::msg(format!("malformed Redis record: {what}"));
    let (&st, mut rest) = value.split_first().ok_or_else(|| bad("empty"))?;
    let state = match st {
        b'i' => RecordState::InProgress,
        b'c' => RecordState::Completed,
        _ => return Err(bad("state")),
    };
    let mut number = |what: &str| -> Result<i64, StoreError> {
        let end = rest
            .iter()
            .position(|&b| b == b'|')
            .ok_or_else(|| bad(what))?;
        // Digits, and a sign only on a fence: the scripts compare the fence as text.
        let digits = rest[..end].strip_prefix(b"-").unwrap_or(&rest[..end]);
        let signed = digits.len() < end;
        // As itoa writes them: no leading zero, no `-0`.
        let canonical = digits.first() != Some(&b'0') || digits == b"0" && !signed;
        if digits.is_empty()
            || !digits.iter().all(u8::is_ascii_digit)
            || !canonical
            || signed && what != "fence"
        {
            return Err(bad(what));
        }
        let n = std::str::from_utf8(&rest[..end])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| bad(what))?;
        rest = &rest[end + 1..];
        Ok(n)
    };
    let fence = number("fence")?;
    let retention = number("retention")?;
    let attempts = number("attempts")?;
    let owner_len = number("owner length")?;
    let fp_len = number("fingerprint length")?;
    let mut take = |n: i64, what: &str| -> Result<&[u8], StoreError> {
        let n = usize::try_from(n).map_err(|_| bad(what))?;
        let (part, tail) = rest.split_at_checked(n).ok_or_else(|| bad(what))?;
        rest = tail;
        Ok(part)
    };
    let owner = String::from_utf8(take(owner_len, "owner")?.to_vec()).map_err(|_| bad("owner"))?;
    let fingerprint = match take(fp_len, "fingerprint")? {
        [] => None,
        fp => Some(Fingerprint::from_bytes(fp).ok_or_else(|| bad("fingerprint"))?),
    };
    let result = match state {
        RecordState::InProgress if rest.is_empty() => None,
        RecordState::InProgress => return Err(bad("a result on a record in progress")),
        RecordState::Completed => {
            let end = rest
                .iter()
                .position(|&b| b == b'|')
                .ok_or_else(|| bad("codec"))?;
            let codec = std::str::from_utf8(&rest[..end]).map_err(|_| bad("codec"))?;
            Some(StoredResult {
                codec: codec.parse::<Codec>().map_err(StoreError::new)?,
                bytes: rest[end + 1..].to_vec(),
            })
        }
    };
    // The key expires its retention after the lease (in progress) or the result (completed).
    // A key without a TTL (`PERSIST`ed, or restored without one) says nothing about either:
    // refused, rather than read as expired and run again.
    if ttl_ms < 0 {
        return Err(bad("the key has no TTL"));
    }
    let left = Duration::from_millis(u64::try_from(ttl_ms.saturating_sub(retention)).unwrap_or(0));
    Ok(Record {
        state,
        fingerprint,
        fence: Fence::from_raw(fence),
        owner,
        attempts: u32::try_from(attempts).unwrap_or(0),
        lease_remaining: match state {
            RecordState::InProgress => left,
            RecordState::Completed => Duration::ZERO,
        },
        expires_in: left,
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::RecordId;

    fn claim<'a>(id: &'a RecordId, fp: Option<&'a Fingerprint>) -> Claim<'a> {
        Claim {
            id,
            fence: Fence::from_raw(-42),
            owner: "host-1|pid 7",
            fingerprint: fp,
            lease: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_claim_and_its_result_read_back_as_written() {
        let id = RecordId::new("f", "k");
        let fp = Fingerprint::of(&"payload").expect("fingerprint");
        for fp in [None, Some(&fp)] {
            let (head, tail) = claim_value(&claim(&id, fp), 60_000);
            let value = [&head[..], b"3", &tail[..]].concat();
            let r = record(&value, 90_000).expect("in progress");
            assert_eq!(r.state, RecordState::InProgress);
            assert_eq!(
                (r.fence.get(), r.owner.as_str(), r.attempts),
                (-42, "host-1|pid 7", 3)
            );
            assert_eq!(r.fingerprint.as_ref(), fp);
            assert_eq!(r.lease_remaining, Duration::from_secs(30));
            assert_eq!(r.expires_in, Duration::from_secs(30));
            assert!(r.result.is_none());

            // What FINALIZE writes: the state flipped, the result appended.
            let result = StoredResult {
                codec: Codec::Json,
                bytes: b"{\"a\":\"|\"}".to_vec(),
            };
            let done = [&b"c"[..], &value[1..], &result_value(&result)].concat();
            let r = record(&done, 60_500).expect("completed");
            assert_eq!(r.state, RecordState::Completed);
            assert_eq!(r.fingerprint.as_ref(), fp);
            assert_eq!(r.lease_remaining, Duration::ZERO);
            assert_eq!(r.expires_in, Duration::from_millis(500));
            let stored = r.result.expect("result");
            assert_eq!((stored.codec, stored.bytes), (result.codec, result.bytes));
        }
    }

    #[test]
    fn a_record_past_its_lease_has_nothing_left_and_a_bad_one_is_an_error() {
        let id = RecordId::new("f", "k");
        let (head, tail) = claim_value(&claim(&id, None), 60_000);
        let value = [&head[..], b"1", &tail[..]].concat();
        assert_eq!(
            record(&value, 10).expect("ok").lease_remaining,
            Duration::ZERO
        );
        assert_eq!(record(&value, 0).expect("ok").expires_in, Duration::ZERO);
        assert!(
            record(&value, -1).is_err(),
            "a key without a TTL is not an expired one"
        );
        for bad in [
            &b""[..],
            b"x1|2|3|0|0|",
            b"i1|2|3|9|0|ab",
            b"i1|2|3|0|5|abcde",
            b"i1|2|3|0|0|extra",
            b"inope|2|3|0|0|",
            b"i+1|2|3|0|0|",
            b"i07|2|3|0|0|",
            b"i-0|2|3|0|0|",
            b"i1|-2|3|0|0|",
            b"i1|1e3|3|0|0|",
            b"i1|2| 3|0|0|",
            b"c1|2|3|0|0|",
            b"c1|2|3|0|0|nocodec|x",
        ] {
            assert!(
                record(bad, 1_000).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
