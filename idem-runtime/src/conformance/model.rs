//! The reference model of the record protocol: what a store must answer, worked out without
//! a store.
//!
//! A model holds, for each key of a run, the record a correct store would hold. Time is the
//! one thing it cannot know exactly: the store reads its own clock at some instant between
//! the moment the runner sent a statement and the moment the answer came back (a
//! [`Window`]). So a short lease is kept as the interval in which it may run out, and where
//! an answer depends on whether it already has, the model allows both and keeps, for each,
//! the narrower interval that answer implies. A step therefore maps one model to the set of
//! models consistent with what the store said; an empty set is a protocol violation.

use std::time::{Duration, Instant};

use crate::codec::Codec;
use crate::key::Fingerprint;
use crate::store::{Fence, Record, RecordState, StoredResult};

/// How many keys and simulated owners a run uses: few, so that they collide often.
pub(crate) const KEYS: usize = 2;
pub(crate) const OWNERS: u8 = 3;

/// How far a store's reading of its clock, rounded to milliseconds, may stray from the
/// runner's view of when a statement ran.
const SLACK: Duration = Duration::from_millis(15);

/// A lease or a TTL as a run chooses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Span {
    /// Over the moment it is written (by the store's clock, the next statement sees it over).
    Zero,
    /// A fifth of a second: runs out during a run, at an instant known only roughly.
    Short,
    /// An hour: never runs out during a run.
    Long,
}

impl Span {
    /// The duration sent to the store.
    pub(crate) fn duration(self) -> Duration {
        match self {
            Span::Zero => Duration::ZERO,
            Span::Short => Duration::from_millis(200),
            Span::Long => Duration::from_secs(3600),
        }
    }
}

/// When the runner sent a statement and when its answer came back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
}

/// When a lease or a TTL runs out, as far as the runner can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Deadline {
    /// Somewhere in this interval (runner's clock).
    Between(Instant, Instant),
    Never,
}

impl Deadline {
    fn set(span: Span, w: Window) -> Deadline {
        // A zero lease is over for the store's next statement, unless the store's clock
        // stepped back in between (a wall clock can): it too gets the slack.
        match span {
            Span::Long => Deadline::Never,
            Span::Zero | Span::Short => {
                let d = span.duration();
                Deadline::Between(
                    w.start.checked_sub(SLACK).unwrap_or(w.start) + d,
                    w.end + d + SLACK,
                )
            }
        }
    }

    /// Whether it is over when the store reads its clock within `w`: each possible answer,
    /// with the deadline narrowed to what that answer implies.
    fn outcomes(self, w: Window) -> Vec<(bool, Deadline)> {
        match self {
            Deadline::Never => vec![(false, self)],
            Deadline::Between(lo, hi) => {
                let mut out = Vec::with_capacity(2);
                if lo <= w.end {
                    out.push((true, Deadline::Between(lo, hi.min(w.end))));
                }
                if hi > w.start {
                    out.push((false, Deadline::Between(lo.max(w.start), hi)));
                }
                out
            }
        }
    }

    /// Whether a store may report "no time left" although the deadline is not yet over
    /// (times are read back in whole milliseconds).
    fn may_read_zero(self, w: Window) -> bool {
        matches!(self, Deadline::Between(lo, _) if lo <= w.end + Duration::from_millis(1))
    }
}

/// The record a correct store holds for one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Rec {
    completed: bool,
    fingerprint: Option<u8>,
    fence: Fence,
    owner: u8,
    attempts: u32,
    /// In progress: when the lease (and with it the record) runs out. Completed: when the
    /// result expires.
    until: Deadline,
    result: Option<u8>,
}

/// One statement of a run, with its fences chosen.
#[derive(Clone, Debug)]
pub(crate) enum Call {
    Reserve {
        key: usize,
        fence: Fence,
        owner: u8,
        fingerprint: Option<u8>,
        lease: Span,
    },
    Load {
        key: usize,
    },
    TakeOver {
        key: usize,
        fence: Fence,
        owner: u8,
        fingerprint: Option<u8>,
        lease: Span,
        observed: Fence,
    },
    Heartbeat {
        key: usize,
        fence: Fence,
        lease: Span,
    },
    Finalize {
        key: usize,
        fence: Fence,
        ttl: Span,
        value: u8,
    },
    Release {
        key: usize,
        fence: Fence,
    },
    Purge,
}

/// What a store answered.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    Acquired,
    Exists(Record),
    Vanished,
    Loaded(Option<Record>),
    Done(bool),
    Purged(u64),
}

/// The owner name, fingerprint and result a run writes for small numbers.
pub(crate) fn owner_name(owner: u8) -> String {
    format!("owner-{owner}")
}

pub(crate) fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes(&[n; 16]).unwrap_or_else(|| unreachable!("16 bytes"))
}

pub(crate) fn stored(value: u8) -> StoredResult {
    StoredResult {
        codec: Codec::Json,
        bytes: vec![b'0', value],
    }
}

/// What the model knows about the store as a whole.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    /// Whether `purge` deletes expired records (`false` for a store that expires them by
    /// itself, which then keeps them for longer than a run).
    pub(crate) purges: bool,
    /// How many records of earlier runs on the same table a purge may also delete.
    pub(crate) others: u64,
}

/// The records a correct store holds, one slot per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Model {
    recs: [Option<Rec>; KEYS],
}

impl Model {
    /// How many records may still be there and run out later (for [`Rules::others`]).
    pub(crate) fn may_expire_later(&self) -> u64 {
        self.recs
            .iter()
            .flatten()
            .filter(|r| r.until != Deadline::Never)
            .count() as u64
    }

    /// Whether `seen` may be what a store reads back for the record of `key` within `w`,
    /// without narrowing anything (for answers whose instant is not known).
    pub(crate) fn may_read(&self, key: usize, seen: Option<&Record>, w: Window) -> bool {
        match (&self.recs[key], seen) {
            (None, None) => true,
            (Some(rec), Some(seen)) => !reads(rec, seen, w).is_empty(),
            _ => false,
        }
    }

    /// Whether the record of `key` exists.
    pub(crate) fn has(&self, key: usize) -> bool {
        self.recs[key].is_some()
    }

    /// The models that may follow this one when `call` got `answer` within `w`.
    pub(crate) fn step(&self, call: &Call, answer: &Answer, w: Window, rules: Rules) -> Vec<Model> {
        match call {
            Call::Purge => self.purge(answer, w, rules),
            Call::Reserve { key, .. } | Call::Load { key } | Call::TakeOver { key, .. } => {
                let Some(rec) = &self.recs[*key] else {
                    return self.on_absent(call, answer, w);
                };
                self.on_present(*key, rec, call, answer, w)
            }
            Call::Heartbeat { key, fence, lease } => {
                let owned = self.owned(*key, *fence);
                self.write(*key, answer, owned, |rec| {
                    rec.map(|r| Rec {
                        until: Deadline::set(*lease, w),
                        ..r
                    })
                })
            }
            Call::Finalize {
                key,
                fence,
                ttl,
                value,
            } => {
                let owned = self.owned(*key, *fence);
                self.write(*key, answer, owned, |rec| {
                    rec.map(|r| Rec {
                        completed: true,
                        until: Deadline::set(*ttl, w),
                        result: Some(*value),
                        ..r
                    })
                })
            }
            Call::Release { key, fence } => {
                let owned = self.owned(*key, *fence);
                self.write(*key, answer, owned, |_| None)
            }
        }
    }

    fn owned(&self, key: usize, fence: Fence) -> bool {
        matches!(&self.recs[key], Some(r) if !r.completed && r.fence == fence)
    }

    /// A fenced write: `Done(owned)` is the only right answer; it changes the record only
    /// when owned. Fenced writes read no clock.
    fn write(
        &self,
        key: usize,
        answer: &Answer,
        owned: bool,
        change: impl FnOnce(Option<Rec>) -> Option<Rec>,
    ) -> Vec<Model> {
        if !matches!(answer, Answer::Done(b) if *b == owned) {
            return vec![];
        }
        let mut next = self.clone();
        if owned {
            next.recs[key] = change(next.recs[key].take());
        }
        vec![next]
    }

    fn on_absent(&self, call: &Call, answer: &Answer, w: Window) -> Vec<Model> {
        match (call, answer) {
            (
                Call::Reserve {
                    key,
                    fence,
                    owner,
                    fingerprint,
                    lease,
                },
                Answer::Acquired,
            ) => {
                let mut next = self.clone();
                next.recs[*key] = Some(Rec {
                    completed: false,
                    fingerprint: *fingerprint,
                    fence: *fence,
                    owner: *owner,
                    attempts: 1,
                    until: Deadline::set(*lease, w),
                    result: None,
                });
                vec![next]
            }
            (Call::Load { .. }, Answer::Loaded(None))
            | (Call::TakeOver { .. }, Answer::Done(false)) => {
                vec![self.clone()]
            }
            _ => vec![],
        }
    }

    fn on_present(
        &self,
        key: usize,
        rec: &Rec,
        call: &Call,
        answer: &Answer,
        w: Window,
    ) -> Vec<Model> {
        let with = |r: Option<Rec>| {
            let mut next = self.clone();
            next.recs[key] = r;
            next
        };
        match (call, answer) {
            (Call::Reserve { .. }, Answer::Exists(seen))
            | (Call::Load { .. }, Answer::Loaded(Some(seen))) => reads(rec, seen, w)
                .into_iter()
                .map(|r| with(Some(r)))
                .collect(),
            (
                Call::TakeOver {
                    fence,
                    owner,
                    fingerprint,
                    lease,
                    observed,
                    ..
                },
                Answer::Done(took),
            ) => {
                if rec.fence != *observed {
                    return if *took { vec![] } else { vec![self.clone()] };
                }
                let mut out = vec![];
                for (over, until) in rec.until.outcomes(w) {
                    if over != *took {
                        continue;
                    }
                    out.push(with(Some(if over {
                        Rec {
                            completed: false,
                            fingerprint: *fingerprint,
                            fence: *fence,
                            owner: *owner,
                            attempts: if rec.completed { 1 } else { rec.attempts + 1 },
                            until: Deadline::set(*lease, w),
                            result: None,
                        }
                    } else {
                        Rec {
                            until,
                            ..rec.clone()
                        }
                    })));
                }
                out
            }
            _ => vec![],
        }
    }

    fn purge(&self, answer: &Answer, w: Window, rules: Rules) -> Vec<Model> {
        let Answer::Purged(n) = *answer else {
            return vec![];
        };
        if !rules.purges {
            return if n == 0 { vec![self.clone()] } else { vec![] };
        }
        // Every combination of "over or not" for the records whose deadline may have passed.
        let mut out = vec![(self.clone(), 0u64)];
        for key in 0..KEYS {
            let Some(rec) = &self.recs[key] else { continue };
            let mut next = Vec::with_capacity(out.len() * 2);
            for (model, deleted) in &out {
                for (over, until) in rec.until.outcomes(w) {
                    let mut m = model.clone();
                    if over {
                        m.recs[key] = None;
                        next.push((m, deleted + 1));
                    } else {
                        m.recs[key] = Some(Rec {
                            until,
                            ..rec.clone()
                        });
                        next.push((m, *deleted));
                    }
                }
            }
            out = next;
        }
        out.into_iter()
            .filter(|(_, deleted)| *deleted <= n && n <= deleted + rules.others)
            .map(|(m, _)| m)
            .collect()
    }
}

/// The ways `rec` may be read back as `seen` within `w`, each with its deadline narrowed.
fn reads(rec: &Rec, seen: &Record, w: Window) -> Vec<Rec> {
    let same = seen.state
        == (if rec.completed {
            RecordState::Completed
        } else {
            RecordState::InProgress
        })
        && seen.fingerprint == rec.fingerprint.map(fingerprint)
        && seen.fence == rec.fence
        && seen.owner == owner_name(rec.owner)
        && seen.attempts == rec.attempts
        && seen.result == rec.result.map(stored);
    if !same {
        return vec![];
    }
    let left = if rec.completed {
        if !seen.lease_remaining.is_zero() {
            return vec![];
        }
        seen.expires_in
    } else {
        if seen.expires_in.is_zero() != seen.lease_remaining.is_zero() {
            return vec![];
        }
        seen.lease_remaining
    };
    let mut out = vec![];
    for (over, until) in rec.until.outcomes(w) {
        let fits = if over {
            left.is_zero()
        } else {
            !left.is_zero() || rec.until.may_read_zero(w)
        };
        if fits {
            out.push(Rec {
                until,
                ..rec.clone()
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Window {
        let base = base();
        Window {
            start: base + Duration::from_millis(ms),
            end: base + Duration::from_millis(ms + 1),
        }
    }

    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    const RULES: Rules = Rules {
        purges: true,
        others: 0,
    };

    #[test]
    fn a_short_lease_is_live_then_unknown_then_over() {
        let d = Deadline::set(Span::Short, at(0));
        assert_eq!(
            d.outcomes(at(10)).iter().map(|o| o.0).collect::<Vec<_>>(),
            [false]
        );
        assert_eq!(d.outcomes(at(200)).len(), 2);
        assert_eq!(
            d.outcomes(at(400)).iter().map(|o| o.0).collect::<Vec<_>>(),
            [true]
        );
        // Once seen over, it stays over.
        let (_, narrowed) = d.outcomes(at(200))[0];
        assert_eq!(
            narrowed
                .outcomes(at(202))
                .iter()
                .map(|o| o.0)
                .collect::<Vec<_>>(),
            [true]
        );
    }

    #[test]
    fn a_takeover_needs_the_observed_fence_and_an_over_lease() {
        let (a, b, c) = (Fence::random(), Fence::random(), Fence::random());
        let reserve = Call::Reserve {
            key: 0,
            fence: a,
            owner: 0,
            fingerprint: None,
            lease: Span::Zero,
        };
        let m = Model::default().step(&reserve, &Answer::Acquired, at(0), RULES);
        assert_eq!(m.len(), 1);
        let take = |observed, fence| Call::TakeOver {
            key: 0,
            fence,
            owner: 1,
            fingerprint: None,
            lease: Span::Long,
            observed,
        };
        assert!(
            m[0].step(&take(b, c), &Answer::Done(true), at(5), RULES)
                .is_empty()
        );
        let next = m[0].step(&take(a, b), &Answer::Done(true), at(5), RULES);
        assert_eq!(next.len(), 1);
        let late = Call::Finalize {
            key: 0,
            fence: a,
            ttl: Span::Long,
            value: 1,
        };
        assert!(
            next[0]
                .step(&late, &Answer::Done(true), at(6), RULES)
                .is_empty()
        );
        assert_eq!(
            next[0]
                .step(&late, &Answer::Done(false), at(6), RULES)
                .len(),
            1
        );
    }
}
