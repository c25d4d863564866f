//! A record row as the dialects select it, and the time arithmetic around it.

use std::time::Duration;

use crate::codec::Codec;
use crate::error::StoreError;
use crate::key::Fingerprint;
use crate::store::{Fence, Record, RecordState, StoredResult};

/// Milliseconds as a duration; negative means "already past" and becomes zero.
pub(crate) fn remaining(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration as whole milliseconds for a bind parameter, rounded up so a lease of 0.5 ms
/// is not stored as already over. Durations are capped at ten years by config parsing.
pub(crate) fn millis(d: Duration) -> i64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The columns of a loaded row, as every dialect selects them, before interpretation.
#[allow(unreachable_pub)] // named by the sealed dialect machinery; not reachable by users
pub struct RawRecord {
    pub(crate) state: String,
    pub(crate) fingerprint: Option<Vec<u8>>,
    pub(crate) fence: i64,
    pub(crate) owner: String,
    pub(crate) attempts: i64,
    pub(crate) lease_remaining_ms: Option<i64>,
    pub(crate) expires_in_ms: i64,
    pub(crate) result: Option<Vec<u8>>,
    pub(crate) codec: Option<String>,
}

impl RawRecord {
    pub(crate) fn into_record(self) -> Result<Record, StoreError> {
        let state = RecordState::parse(&self.state)
            .ok_or_else(|| StoreError::msg(format!("unknown record state {:?}", self.state)))?;
        let fingerprint = match self.fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint::from_bytes(&bytes).ok_or_else(|| {
                StoreError::msg(format!(
                    "fingerprint has {} bytes, expected 16",
                    bytes.len()
                ))
            })?),
        };
        let result = match (self.result, self.codec) {
            (Some(bytes), Some(codec)) => Some(StoredResult {
                codec: codec.parse::<Codec>().map_err(StoreError::new)?,
                bytes,
            }),
            _ => None,
        };
        Ok(Record {
            state,
            fingerprint,
            fence: Fence::from_raw(self.fence),
            owner: self.owner,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            lease_remaining: match state {
                RecordState::InProgress => remaining(self.lease_remaining_ms.unwrap_or(0)),
                RecordState::Completed => Duration::ZERO,
            },
            expires_in: remaining(self.expires_in_ms),
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up() {
        assert_eq!(millis(Duration::from_micros(500)), 1);
        assert_eq!(millis(Duration::from_millis(30)), 30);
        assert_eq!(remaining(-5), Duration::ZERO);
    }
}
