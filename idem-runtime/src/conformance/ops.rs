//! The operations of a model-based run: how they are generated, which statements they send
//! with which fences, and what each owner learns from the answers.

use proptest::prelude::*;

use super::model::{Answer, Call, KEYS, OWNERS, Span, fingerprint, owner_name, stored};
use crate::key::RecordId;
use crate::store::{Claim, Fence, Finalize, Heartbeat, Release, Reservation, Store};

/// A verb that can go through a `_many` batch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Verb {
    /// `reserve_many`.
    Reserve,
    /// `heartbeat_many`.
    Heartbeat,
    /// `finalize_many`.
    Finalize,
    /// `release_many`.
    Release,
}

/// One generated operation. Owners and keys are small indices; fences are chosen when the
/// operation runs, from what its owner has seen.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// A fresh claim (`fingerprint` 0: none).
    Reserve {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
        /// Its lease.
        lease: Span,
        /// Its payload.
        fingerprint: u8,
    },
    /// A read, which updates what the owner has seen.
    Load {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
    },
    /// A takeover with the fence the owner last saw.
    TakeOver {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
        /// The new lease.
        lease: Span,
        /// The new payload.
        fingerprint: u8,
    },
    /// A heartbeat with the owner's last claimed fence.
    Heartbeat {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
        /// The new lease.
        lease: Span,
    },
    /// A finalize with the owner's last claimed fence.
    Finalize {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
        /// How long to keep the result.
        ttl: Span,
    },
    /// A release with the owner's last claimed fence.
    Release {
        /// Who.
        owner: u8,
        /// Which record.
        key: u8,
    },
    /// Delete what expired.
    Purge,
    /// Let time pass.
    Sleep {
        /// How long.
        ms: u16,
    },
    /// One `_many` statement: for each key, the owner whose item it carries (if any).
    Batch {
        /// Which verb.
        verb: Verb,
        /// The lease or TTL of every item.
        span: Span,
        /// Per key: the owner of its item.
        owners: Vec<Option<u8>>,
    },
}

fn span() -> impl Strategy<Value = Span> {
    prop_oneof![Just(Span::Long), Just(Span::Zero), Just(Span::Short)]
}

fn op() -> impl Strategy<Value = Op> {
    let owner = 0..OWNERS;
    let key = 0..KEYS as u8;
    let verb = prop_oneof![
        Just(Verb::Reserve),
        Just(Verb::Finalize),
        Just(Verb::Heartbeat),
        Just(Verb::Release)
    ];
    prop_oneof![
        4 => (owner.clone(), key.clone(), span(), 0..3u8)
            .prop_map(|(owner, key, lease, fingerprint)| Op::Reserve { owner, key, lease, fingerprint }),
        2 => (owner.clone(), key.clone()).prop_map(|(owner, key)| Op::Load { owner, key }),
        3 => (owner.clone(), key.clone(), span(), 0..3u8)
            .prop_map(|(owner, key, lease, fingerprint)| Op::TakeOver { owner, key, lease, fingerprint }),
        2 => (owner.clone(), key.clone(), span())
            .prop_map(|(owner, key, lease)| Op::Heartbeat { owner, key, lease }),
        3 => (owner.clone(), key.clone(), span())
            .prop_map(|(owner, key, ttl)| Op::Finalize { owner, key, ttl }),
        2 => (owner.clone(), key).prop_map(|(owner, key)| Op::Release { owner, key }),
        1 => Just(Op::Purge),
        2 => (verb, span(), proptest::collection::vec(proptest::option::of(owner), KEYS))
            .prop_map(|(verb, span, owners)| Op::Batch { verb, span, owners }),
    ]
}

/// A step: one operation, or (concurrent variant) up to three sent at once, or a sleep.
pub(super) fn step(concurrent: bool) -> impl Strategy<Value = Vec<Op>> {
    let width = if concurrent { 1..=3usize } else { 1..=1 };
    prop_oneof![
        12 => proptest::collection::vec(op(), width),
        1 => (20..300u16).prop_map(|ms| vec![Op::Sleep { ms }]),
    ]
}

/// What one owner knows about one record.
#[derive(Clone, Copy, Default)]
pub(super) struct View {
    /// The fence of its last successful claim.
    pub(super) mine: Option<Fence>,
    /// The fence it last saw on the record.
    pub(super) seen: Option<Fence>,
}

/// The statements `op` sends, with the owner of each, and fences from the owners' views.
pub(super) fn resolve(op: &Op, views: &[[View; KEYS]]) -> Vec<(u8, Call)> {
    let mine = |owner: u8, key: u8| {
        views[owner as usize][key as usize]
            .mine
            .unwrap_or_else(Fence::random)
    };
    let fp = |n: u8| (n > 0).then_some(n);
    let one = |owner: u8, key: u8, verb: Verb, span: Span| -> Call {
        let k = key as usize;
        match verb {
            Verb::Reserve => Call::Reserve {
                key: k,
                fence: Fence::random(),
                owner,
                fingerprint: None,
                lease: span,
            },
            Verb::Heartbeat => Call::Heartbeat {
                key: k,
                fence: mine(owner, key),
                lease: span,
            },
            Verb::Finalize => Call::Finalize {
                key: k,
                fence: mine(owner, key),
                ttl: span,
                value: owner,
            },
            Verb::Release => Call::Release {
                key: k,
                fence: mine(owner, key),
            },
        }
    };
    match *op {
        Op::Reserve {
            owner,
            key,
            lease,
            fingerprint,
        } => vec![(
            owner,
            Call::Reserve {
                key: key as usize,
                fence: Fence::random(),
                owner,
                fingerprint: fp(fingerprint),
                lease,
            },
        )],
        Op::Load { owner, key } => vec![(owner, Call::Load { key: key as usize })],
        Op::TakeOver {
            owner,
            key,
            lease,
            fingerprint,
        } => vec![(
            owner,
            Call::TakeOver {
                key: key as usize,
                fence: Fence::random(),
                owner,
                fingerprint: fp(fingerprint),
                lease,
                observed: views[owner as usize][key as usize]
                    .seen
                    .unwrap_or_else(Fence::random),
            },
        )],
        Op::Heartbeat { owner, key, lease } => {
            vec![(owner, one(owner, key, Verb::Heartbeat, lease))]
        }
        Op::Finalize { owner, key, ttl } => vec![(owner, one(owner, key, Verb::Finalize, ttl))],
        Op::Release { owner, key } => vec![(owner, one(owner, key, Verb::Release, Span::Long))],
        Op::Purge => vec![(0, Call::Purge)],
        Op::Sleep { .. } => vec![],
        Op::Batch {
            verb,
            span,
            ref owners,
        } => owners
            .iter()
            .enumerate()
            .filter_map(|(key, owner)| owner.map(|o| (o, one(o, key as u8, verb, span))))
            .collect(),
    }
}

/// Sends one operation's statements: a single verb, or one `_many` call for a batch.
pub(super) async fn send(
    store: &dyn Store,
    ids: &[RecordId],
    calls: &[(u8, Call)],
    batch: bool,
) -> Vec<Result<Answer, crate::StoreError>> {
    if calls.is_empty() {
        return vec![];
    }
    let names: Vec<String> = calls.iter().map(|(o, _)| owner_name(*o)).collect();
    let fps: Vec<_> = calls
        .iter()
        .map(|(_, c)| match c {
            Call::Reserve { fingerprint, .. } | Call::TakeOver { fingerprint, .. } => {
                fingerprint.map(fingerprint_of)
            }
            _ => None,
        })
        .collect();
    let results: Vec<_> = calls
        .iter()
        .map(|(_, c)| match c {
            Call::Finalize { value, .. } => stored(*value),
            _ => stored(0),
        })
        .collect();
    let claim = |i: usize, key: usize, fence: Fence, lease: Span| Claim {
        id: &ids[key],
        fence,
        owner: &names[i],
        fingerprint: fps[i].as_ref(),
        lease: lease.duration(),
    };
    let reservation = |r: Reservation| match r {
        Reservation::Acquired => Answer::Acquired,
        Reservation::Exists(rec) => Answer::Exists(rec),
        Reservation::Vanished => Answer::Vanished,
    };
    let done = |r: Vec<Result<bool, crate::StoreError>>| {
        r.into_iter().map(|r| r.map(Answer::Done)).collect()
    };
    if !batch {
        let out = match &calls[0].1 {
            Call::Reserve {
                key, fence, lease, ..
            } => store
                .reserve(&claim(0, *key, *fence, *lease))
                .await
                .map(reservation),
            Call::Load { key } => store.load(&ids[*key]).await.map(Answer::Loaded),
            Call::TakeOver {
                key,
                fence,
                lease,
                observed,
                ..
            } => store
                .take_over(&claim(0, *key, *fence, *lease), *observed)
                .await
                .map(Answer::Done),
            Call::Heartbeat { key, fence, lease } => store
                .heartbeat(&ids[*key], *fence, lease.duration())
                .await
                .map(Answer::Done),
            Call::Finalize {
                key, fence, ttl, ..
            } => store
                .finalize(&ids[*key], *fence, &results[0], ttl.duration())
                .await
                .map(Answer::Done),
            Call::Release { key, fence } => {
                store.release(&ids[*key], *fence).await.map(Answer::Done)
            }
            Call::Purge => store.purge(10_000).await.map(Answer::Purged),
        };
        return vec![out];
    }
    // A batch: every call has the same verb, on distinct keys, in key order.
    match &calls[0].1 {
        Call::Reserve { .. } => {
            let claims: Vec<Claim<'_>> = calls
                .iter()
                .enumerate()
                .filter_map(|(i, (_, c))| match c {
                    Call::Reserve {
                        key, fence, lease, ..
                    } => Some(claim(i, *key, *fence, *lease)),
                    _ => None,
                })
                .collect();
            store
                .reserve_many(&claims)
                .await
                .into_iter()
                .map(|r| r.map(reservation))
                .collect()
        }
        Call::Heartbeat { .. } => {
            let items: Vec<Heartbeat<'_>> = calls
                .iter()
                .filter_map(|(_, c)| match c {
                    Call::Heartbeat { key, fence, lease } => Some(Heartbeat {
                        id: &ids[*key],
                        fence: *fence,
                        lease: lease.duration(),
                    }),
                    _ => None,
                })
                .collect();
            done(store.heartbeat_many(&items).await)
        }
        Call::Finalize { .. } => {
            let items: Vec<Finalize<'_>> = calls
                .iter()
                .enumerate()
                .filter_map(|(i, (_, c))| match c {
                    Call::Finalize {
                        key, fence, ttl, ..
                    } => Some(Finalize {
                        id: &ids[*key],
                        fence: *fence,
                        result: &results[i],
                        ttl: ttl.duration(),
                    }),
                    _ => None,
                })
                .collect();
            done(store.finalize_many(&items).await)
        }
        _ => {
            let items: Vec<Release<'_>> = calls
                .iter()
                .filter_map(|(_, c)| match c {
                    Call::Release { key, fence } => Some(Release {
                        id: &ids[*key],
                        fence: *fence,
                    }),
                    _ => None,
                })
                .collect();
            done(store.release_many(&items).await)
        }
    }
}

fn fingerprint_of(n: u8) -> crate::key::Fingerprint {
    fingerprint(n)
}

/// What an owner learns from an answer.
pub(super) fn learn(view: &mut [View; KEYS], call: &Call, answer: &Answer) {
    match (call, answer) {
        (Call::Reserve { key, fence, .. }, Answer::Acquired)
        | (Call::TakeOver { key, fence, .. }, Answer::Done(true)) => {
            view[*key].mine = Some(*fence);
            view[*key].seen = Some(*fence);
        }
        (Call::Reserve { key, .. }, Answer::Exists(rec))
        | (Call::Load { key }, Answer::Loaded(Some(rec))) => {
            view[*key].seen = Some(rec.fence);
        }
        (Call::Load { key }, Answer::Loaded(None)) => view[*key].seen = None,
        _ => {}
    }
}

pub(super) fn show_call(call: &Call) -> String {
    match call {
        Call::Reserve {
            key,
            fence,
            fingerprint,
            lease,
            ..
        } => {
            format!("reserve k{key} {fence:?} fp={fingerprint:?} lease={lease:?}")
        }
        Call::Load { key } => format!("load k{key}"),
        Call::TakeOver {
            key,
            fence,
            lease,
            observed,
            ..
        } => {
            format!("take over k{key} from {observed:?} as {fence:?} lease={lease:?}")
        }
        Call::Heartbeat { key, fence, lease } => {
            format!("heartbeat k{key} {fence:?} lease={lease:?}")
        }
        Call::Finalize {
            key, fence, ttl, ..
        } => format!("finalize k{key} {fence:?} ttl={ttl:?}"),
        Call::Release { key, fence } => format!("release k{key} {fence:?}"),
        Call::Purge => "purge".into(),
    }
}

pub(super) fn show_answer(answer: &Answer) -> String {
    let rec = |r: &crate::store::Record| {
        format!(
            "{:?} {:?} {} attempts={} lease={:?} expires_in={:?} result={}",
            r.state,
            r.fence,
            r.owner,
            r.attempts,
            r.lease_remaining,
            r.expires_in,
            r.result.is_some()
        )
    };
    match answer {
        Answer::Acquired => "acquired".into(),
        Answer::Exists(r) => format!("exists: {}", rec(r)),
        Answer::Vanished => "vanished".into(),
        Answer::Loaded(None) => "none".into(),
        Answer::Loaded(Some(r)) => format!("loaded: {}", rec(r)),
        Answer::Done(b) => b.to_string(),
        Answer::Purged(n) => format!("purged {n}"),
    }
}
