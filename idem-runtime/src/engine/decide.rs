//! Deciding what to do about a record that already exists: one pure function of the record
//! and the caller's payload fingerprint, the table every path (leased and transactional)
//! follows.
//!
//! | record | same payload | other payload |
//! | --- | --- | --- |
//! | completed, not expired | replay | `PayloadMismatch` |
//! | in progress, lease live | wait (or reject) | `PayloadMismatch` |
//! | in progress, lease over (its owner stopped) | take over | `PayloadMismatch` |
//! | completed and expired | take over (reuse) | take over (reuse) |

use std::time::Duration;

use crate::key::Fingerprint;
use crate::store::{Record, RecordState};

/// What the engine does about an existing record. Pure: decided from the record alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Replay,
    PayloadMismatch,
    Wait { retry_after: Duration },
    TakeOver,
}

pub(crate) fn decide(record: &Record, fingerprint: Option<&Fingerprint>) -> Decision {
    let mismatch = match (record.fingerprint.as_ref(), fingerprint) {
        (Some(stored), Some(ours)) => stored != ours,
        // A record without a fingerprint (or a fn without one) cannot be compared.
        _ => false,
    };
    match record.state {
        RecordState::Completed if !record.expires_in.is_zero() => {
            if mismatch {
                Decision::PayloadMismatch
            } else {
                Decision::Replay
            }
        }
        RecordState::InProgress if !record.lease_remaining.is_zero() => {
            if mismatch {
                Decision::PayloadMismatch
            } else {
                Decision::Wait {
                    retry_after: record.lease_remaining,
                }
            }
        }
        // Its owner stopped heartbeating. Only a retry of the same request may run it again:
        // another payload under this key is a client bug, not a takeover.
        RecordState::InProgress if mismatch => Decision::PayloadMismatch,
        // Expired, or abandoned: whatever it held is over.
        RecordState::Completed | RecordState::InProgress => Decision::TakeOver,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Fence;

    fn record(state: RecordState, lease_ms: u64, expires_ms: u64, fp: Option<u8>) -> Record {
        Record {
            state,
            fingerprint: fp.map(|b| Fingerprint::from_bytes(&[b; 16]).expect("16 bytes")),
            fence: Fence::from_raw(1),
            owner: "o".into(),
            attempts: 1,
            lease_remaining: Duration::from_millis(lease_ms),
            expires_in: Duration::from_millis(expires_ms),
            result: None,
        }
    }

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes(&[b; 16]).expect("16 bytes")
    }

    #[test]
    fn completed_and_live_replays_for_the_same_payload_only() {
        let r = record(RecordState::Completed, 0, 1_000, Some(1));
        assert_eq!(decide(&r, Some(&fp(1))), Decision::Replay);
        assert_eq!(decide(&r, Some(&fp(2))), Decision::PayloadMismatch);
        assert_eq!(
            decide(&r, None),
            Decision::Replay,
            "no fingerprint, no check"
        );
    }

    #[test]
    fn in_progress_with_a_live_lease_waits() {
        let r = record(RecordState::InProgress, 700, 700, Some(1));
        assert_eq!(
            decide(&r, Some(&fp(1))),
            Decision::Wait {
                retry_after: Duration::from_millis(700)
            }
        );
        assert_eq!(decide(&r, Some(&fp(9))), Decision::PayloadMismatch);
    }

    #[test]
    fn over_leases_and_expired_results_are_taken_over() {
        let r = record(RecordState::InProgress, 0, 0, Some(1));
        assert_eq!(decide(&r, Some(&fp(1))), Decision::TakeOver);
        assert_eq!(
            decide(&r, Some(&fp(2))),
            Decision::PayloadMismatch,
            "an abandoned call is only re-run for its own payload"
        );
        let r = record(RecordState::Completed, 0, 0, Some(1));
        assert_eq!(decide(&r, Some(&fp(2))), Decision::TakeOver);
    }
}
