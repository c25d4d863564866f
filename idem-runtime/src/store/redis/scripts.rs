//! The Lua scripts, one per verb, and the record as they read it back.

use std::time::Duration;

use redis::{Script, Value};

use crate::codec::Codec;
use crate::error::StoreError;
use crate::key::Fingerprint;
use crate::store::{Fence, Record, RecordState, StoredResult};

/// The scripts' shared start: the server's time in milliseconds, and the record's key.
macro_rules! script {
    ($body:literal) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            "local k = KEYS[1]\n",
            $body
        )
    };
}

/// The fields of a record, read back: state, fingerprint, fence, owner, attempts, then the
/// lease and expiry as milliseconds left, result and codec.
const READ: &str = "local r = redis.call('HMGET', k, 'st', 'fp', 'fe', 'ow', 'at', 'lu', 'ex', 'rs', 'cd')
if not r[1] then return false end
return {r[1], r[2], r[3], r[4], tonumber(r[5]), tonumber(r[6]) - now, tonumber(r[7]) - now, r[8], r[9]}";

/// Writes a fresh in-progress record owned by ARGV 1-4 (fence, owner, fingerprint or '',
/// lease ms) over an absent key; ARGV[5] is the retention in ms. Expects `attempts`.
const WRITE_CLAIM: &str = "local until_ms = now + tonumber(ARGV[4])
redis.call('HSET', k, 'st', 'in_progress', 'fe', ARGV[1], 'ow', ARGV[2], 'at', attempts, 'lu', until_ms, 'ex', until_ms)
if ARGV[3] ~= '' then redis.call('HSET', k, 'fp', ARGV[3]) end
redis.call('PEXPIREAT', k, until_ms + tonumber(ARGV[5]))";

/// Inserts if absent (`{1}`), else returns `{0, <the record as READ returns it>}`. One read
/// serves both: every record has a state. A reservation already holding the caller's fence is
/// the caller's own (the client sent the script again after a dropped connection): `{1}`,
/// after writing one field unchanged, so that a `WAIT` on this connection covers the first
/// write (servers count only a connection's own writes).
const RESERVE: &str = script!(
    "local r = redis.call('HMGET', k, 'st', 'fp', 'fe', 'ow', 'at', 'lu', 'ex', 'rs', 'cd')
if r[1] == 'in_progress' and r[3] == ARGV[1] then
  redis.call('HSET', k, 'fe', ARGV[1])
  return {1}
end
if r[1] then
  return {0, r[1], r[2], r[3], r[4], tonumber(r[5]), tonumber(r[6]) - now, tonumber(r[7]) - now, r[8], r[9]}
end
local attempts = 1
{WRITE_CLAIM}
return {1}"
);

const LOAD: &str = script!("{READ}");

/// ARGV 1-5 as for a claim, ARGV[6] the fence the caller saw. A record already holding the
/// caller's new fence is this takeover, sent again: 1 (after the same unchanged write as in
/// `RESERVE`).
const TAKE_OVER: &str = script!(
    "local r = redis.call('HMGET', k, 'st', 'fe', 'lu', 'ex', 'at')
if r[1] == 'in_progress' and r[2] == ARGV[1] then
  redis.call('HSET', k, 'fe', ARGV[1])
  return 1
end
if not r[1] or r[2] ~= ARGV[6] then return 0 end
local over = (r[1] == 'in_progress' and tonumber(r[3]) <= now)
  or (r[1] == 'completed' and tonumber(r[4]) <= now)
if not over then return 0 end
local attempts = 1
if r[1] == 'in_progress' then attempts = tonumber(r[5]) + 1 end
redis.call('DEL', k)
{WRITE_CLAIM}
return 1"
);

/// ARGV: fence, lease ms, retention ms.
const HEARTBEAT: &str = script!(
    "local r = redis.call('HMGET', k, 'st', 'fe')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
local until_ms = now + tonumber(ARGV[2])
redis.call('HSET', k, 'lu', until_ms, 'ex', until_ms)
redis.call('PEXPIREAT', k, until_ms + tonumber(ARGV[3]))
return 1"
);

/// ARGV: fence, result, codec, ttl ms, retention ms. Refused (0) unless in progress under the
/// caller's fence. Already completed under it (this finalize, sent again), it still writes
/// one field, unchanged, so that a `WAIT` after it covers the earlier write.
const FINALIZE: &str = script!(
    "local r = redis.call('HMGET', k, 'st', 'fe')
if r[1] == 'completed' and r[2] == ARGV[1] then
  redis.call('HSET', k, 'fe', ARGV[1])
  return 0
end
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
local until_ms = now + tonumber(ARGV[4])
redis.call('HSET', k, 'st', 'completed', 'rs', ARGV[2], 'cd', ARGV[3], 'ex', until_ms)
redis.call('PEXPIREAT', k, until_ms + tonumber(ARGV[5]))
return 1"
);

/// ARGV: fence.
const RELEASE: &str = script!(
    "local r = redis.call('HMGET', k, 'st', 'fe')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', k)
return 1"
);

/// A script's text with its shared `{..}` parts filled in.
fn fill(text: &str) -> String {
    text.replace("{READ}", READ)
        .replace("{WRITE_CLAIM}", WRITE_CLAIM)
}

/// The scripts, with their `{..}` parts filled in and their SHA1s worked out once.
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
        let script = |s: &str| Script::new(&fill(s));
        Scripts {
            reserve: script(RESERVE),
            load: script(LOAD),
            take_over: script(TAKE_OVER),
            heartbeat: script(HEARTBEAT),
            finalize: script(FINALIZE),
            release: script(RELEASE),
        }
    }
}

/// A record as `READ` returns it.
pub(super) fn record(fields: Vec<Value>) -> Result<Record, StoreError> {
    let bad = |what: &str| StoreError::msg(format!("malformed Redis record: {what}"));
    let [st, fp, fe, ow, at, lease, expires, rs, cd]: [Value; 9] =
        fields.try_into().map_err(|_| bad("field count"))?;
    let text = |v: Value, what: &str| -> Result<String, StoreError> {
        redis::from_redis_value::<String>(v).map_err(|_| bad(what))
    };
    let bytes = |v: Value| -> Result<Option<Vec<u8>>, StoreError> {
        match v {
            Value::Nil => Ok(None),
            other => redis::from_redis_value::<Vec<u8>>(other)
                .map(Some)
                .map_err(|_| bad("bytes")),
        }
    };
    let int = |v: Value, what: &str| -> Result<i64, StoreError> {
        redis::from_redis_value::<i64>(v).map_err(|_| bad(what))
    };
    let state = text(st, "state")?;
    let state = RecordState::parse(&state).ok_or_else(|| bad("state"))?;
    let fingerprint = match bytes(fp)? {
        None => None,
        Some(b) => Some(Fingerprint::from_bytes(&b).ok_or_else(|| bad("fingerprint"))?),
    };
    let fence = text(fe, "fence")?
        .parse::<i64>()
        .map_err(|_| bad("fence"))?;
    let remaining = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let result = match (bytes(rs)?, bytes(cd)?) {
        (Some(bytes), Some(codec)) => {
            let codec = String::from_utf8(codec).map_err(|_| bad("codec"))?;
            Some(StoredResult {
                codec: codec.parse::<Codec>().map_err(StoreError::new)?,
                bytes,
            })
        }
        _ => None,
    };
    Ok(Record {
        state,
        fingerprint,
        fence: Fence::from_raw(fence),
        owner: text(ow, "owner")?,
        attempts: u32::try_from(int(at, "attempts")?).unwrap_or(0),
        lease_remaining: match state {
            RecordState::InProgress => remaining(int(lease, "lease")?),
            RecordState::Completed => Duration::ZERO,
        },
        expires_in: remaining(int(expires, "expiry")?),
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_has_its_parts_filled_in() {
        for text in [RESERVE, LOAD, TAKE_OVER, HEARTBEAT, FINALIZE, RELEASE] {
            assert!(text.starts_with("local t = redis.call('TIME')"), "{text}");
            let filled = fill(text);
            assert!(
                !filled.contains("{READ}") && !filled.contains("{WRITE_CLAIM}"),
                "{filled}"
            );
        }
        assert!(fill(LOAD).contains("HMGET"));
        assert!(fill(RESERVE).contains("PEXPIREAT"));
    }
}
