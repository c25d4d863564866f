//! Model-based conformance: random runs of the protocol's statements by a few simulated
//! owners, each answer checked against the reference [`model`](super::model).
//!
//! A run is a sequence of steps over two keys and three owners: reserve, load, take over,
//! heartbeat, finalize, release (alone or as one batch through the `_many` verbs), purge, and
//! sleeps that let short leases and TTLs run out by the store's own clock. Each owner
//! remembers the fence it last claimed and the fence it last saw, and uses them the way the
//! engine would (a stale owner keeps its old fence; a taker passes the fence it observed), so
//! runs reach the interleavings that break protocols: a takeover racing a heartbeat, a
//! finalize after the record was taken over, a release crossing a takeover, a purge of a
//! lease that just ran out.
//!
//! In the concurrent variant a step is up to three statements sent at once; their answers
//! must be those of some order of them (the check tries every order). A reservation that
//! found a record may report it as it was at any point from its insert to the end of the
//! step, since some stores read the record in a second statement.
//!
//! A failing run is shrunk (proptest's shrinking of the op list) and reported as the
//! shortest failing sequence with every answer. `IDEM_MODEL_CASES` (runs, default 24; the
//! concurrent variant does half), `IDEM_MODEL_STEPS` (longest run, default 24) and
//! `IDEM_MODEL_SEED` (replay a reported seed) tune it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::model::{Answer, Call, KEYS, Model, OWNERS, Rules, Window};
use super::ops::{Op, View, learn, resolve, send, show_answer, show_call, step};
use crate::key::RecordId;
use crate::store::Store;

/// How many runs and how long, from the environment.
struct Knobs {
    cases: u32,
    steps: usize,
    seed: u64,
}

impl Knobs {
    fn from_env(concurrent: bool) -> Knobs {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let cases = var("IDEM_MODEL_CASES").unwrap_or(24) as u32;
        Knobs {
            cases: if concurrent { cases.div_ceil(2) } else { cases },
            steps: var("IDEM_MODEL_STEPS").unwrap_or(24).max(1) as usize,
            seed: var("IDEM_MODEL_SEED").unwrap_or_else(|| fastrand::u64(..)),
        }
    }
}

/// Random sequences of single statements by several owners match the reference model
/// answer for answer (see the [module docs](crate::conformance)).
pub async fn model_sequences(store: &dyn Store) {
    explore(store, false).await;
}

/// Random sequences in which up to three statements are sent at once: their answers are
/// those of some order of them.
pub async fn model_concurrent_steps(store: &dyn Store) {
    explore(store, true).await;
}

async fn explore(store: &dyn Store, concurrent: bool) {
    let knobs = Knobs::from_env(concurrent);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&knobs.seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let strategy = proptest::collection::vec(step(concurrent), 1..=knobs.steps);
    let mut others = 0u64;
    for case in 0..knobs.cases {
        let mut tree = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("generating a run: {e}"));
        let Err(first) = run(store, &tree.current(), concurrent, &mut others).await else {
            continue;
        };
        // Shrink: simplify while the run still fails, step back when it passes.
        let mut smallest = (tree.current(), first);
        for _ in 0..1024 {
            let more = match run(store, &tree.current(), concurrent, &mut others).await {
                Err(report) => {
                    smallest = (tree.current(), report);
                    tree.simplify()
                }
                Ok(()) => tree.complicate(),
            };
            if !more {
                break;
            }
        }
        panic!(
            "the {} store disagrees with the model of the record protocol \
             (run {case}, IDEM_MODEL_SEED={}; shrunk to {} steps):\n{}",
            store.backend(),
            knobs.seed,
            smallest.0.len(),
            smallest.1
        );
    }
}

/// Runs one sequence in a fresh namespace: `Err` is the report of the first disagreement.
async fn run(
    store: &dyn Store,
    steps: &[Vec<Op>],
    concurrent: bool,
    others: &mut u64,
) -> Result<(), String> {
    let ns = format!("model-{:016x}/m::f/v0", fastrand::u64(..));
    let ids: Vec<RecordId> = (0..KEYS)
        .map(|k| RecordId::new(ns.as_str(), format!("k{k}")))
        .collect();
    let mut views = [[View::default(); KEYS]; OWNERS as usize];
    let rules = Rules {
        purges: store.self_expiry().is_none(),
        others: *others,
    };
    let mut models = vec![Model::default()];
    let mut log = String::new();
    let mut outcome = Ok(());
    for (n, step) in steps.iter().enumerate() {
        if let [Op::Sleep { ms }] = step.as_slice() {
            tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await;
            let _ = writeln!(log, "{n:>3}: sleep {ms} ms");
            continue;
        }
        let calls: Vec<Vec<(u8, Call)>> = step.iter().map(|op| resolve(op, &views)).collect();
        let start = Instant::now();
        let answers = super::futures_join_all(
            calls
                .iter()
                .zip(step)
                .map(|(c, op)| send(store, &ids, c, matches!(op, Op::Batch { .. }))),
        )
        .await;
        let w = Window {
            start,
            end: Instant::now(),
        };
        let flat: Vec<(u8, Call, Answer)> = calls
            .into_iter()
            .zip(answers)
            .flat_map(|(c, a)| c.into_iter().zip(a).map(|((o, c), a)| (o, c, a)))
            .filter_map(|(o, c, a)| match a {
                Ok(a) => Some((o, c, a)),
                Err(e) => {
                    // A statement that lost a conflict under concurrency rolled back: it had
                    // no effect, and saying so is allowed. Anything else is a failure.
                    let _ = writeln!(log, "{n:>3}: {c:?} -> error {e}");
                    if !(concurrent && e.is_transaction_conflict()) {
                        outcome = Err(format!("a statement failed: {e}"));
                    }
                    None
                }
            })
            .collect();
        for (owner, call, answer) in &flat {
            let _ = writeln!(
                log,
                "{n:>3}: owner {owner}: {} -> {}",
                show_call(call),
                show_answer(answer)
            );
        }
        if outcome.is_err() {
            break;
        }
        let next = advance(&models, &flat, w, rules);
        if next.is_empty() {
            outcome = Err(if flat.len() == 1 {
                "the last answer is not the model's".to_string()
            } else {
                "no order of the last step's statements gives these answers".to_string()
            });
            break;
        }
        models = next;
        for (owner, call, answer) in &flat {
            learn(&mut views[*owner as usize], call, answer);
        }
    }
    *others += match &outcome {
        Ok(()) => models
            .iter()
            .map(Model::may_expire_later)
            .max()
            .unwrap_or(0),
        Err(_) => KEYS as u64,
    };
    outcome.map_err(|why| format!("{log}{why}"))
}

/// The models consistent with one step's answers. One statement: the model's own step.
/// Several: every order of them, a reservation's read checked against any later point.
fn advance(models: &[Model], flat: &[(u8, Call, Answer)], w: Window, rules: Rules) -> Vec<Model> {
    let mut next: HashSet<Model> = HashSet::new();
    if flat.len() <= 1 {
        for m in models {
            match flat.first() {
                Some((_, call, answer)) => next.extend(m.step(call, answer, w, rules)),
                None => {
                    next.insert(m.clone());
                }
            }
        }
    } else {
        for order in permutations(flat.len()) {
            for m in models {
                next.extend(in_order(m, flat, &order, w, rules));
            }
        }
    }
    next.into_iter().collect()
}

/// The models reached by applying `flat` in `order`, where each reservation that found a
/// record must have seen it as it was at some point from its own turn to the end.
fn in_order(
    m: &Model,
    flat: &[(u8, Call, Answer)],
    order: &[usize],
    w: Window,
    rules: Rules,
) -> Vec<Model> {
    // Each state: the model, and the reservations whose read is not yet accounted for.
    let mut states: Vec<(Model, Vec<usize>)> = vec![(m.clone(), vec![])];
    for &i in order {
        let (_, call, answer) = &flat[i];
        let mut next = vec![];
        for (model, pending) in states {
            match (call, answer) {
                // A reservation that conflicted with one committed during the step may not
                // see that record either (a snapshot from before it): "vanished", as if a
                // release came in between; the caller reserves again.
                (Call::Reserve { key, .. }, Answer::Vanished) if !m.has(*key) => {
                    next.push((model, pending));
                }
                (Call::Reserve { key, .. }, Answer::Exists(_) | Answer::Vanished) => {
                    if model.has(*key) {
                        let mut pending = pending;
                        pending.push(i);
                        next.push((model, pending));
                    }
                }
                _ => next.extend(
                    model
                        .step(call, answer, w, rules)
                        .into_iter()
                        .map(|m| (m, pending.clone())),
                ),
            }
        }
        for (model, pending) in &mut next {
            pending.retain(|&p| !read_fits(model, &flat[p], w));
        }
        states = next;
    }
    states
        .into_iter()
        .filter(|(_, p)| p.is_empty())
        .map(|(m, _)| m)
        .collect()
}

fn read_fits(model: &Model, (_, call, answer): &(u8, Call, Answer), w: Window) -> bool {
    let Call::Reserve { key, .. } = call else {
        return true;
    };
    match answer {
        Answer::Exists(rec) => model.may_read(*key, Some(rec), w),
        Answer::Vanished => !model.has(*key),
        _ => true,
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = vec![];
    for p in permutations(n - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, n - 1);
            out.push(q);
        }
    }
    out
}
