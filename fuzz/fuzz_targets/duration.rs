//! The duration literal parser (`ttl = "PT5M"`, `"30s"`): any text gets a duration or a
//! clear error, never a panic, and the same text always the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let first = idem_duration::parse(input);
    let again = idem_duration::parse(input);
    match (&first, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => {
            let message = a.to_string();
            assert!(!message.is_empty());
            assert_eq!(message, b.to_string());
        }
        _ => panic!("{input:?} parsed differently twice"),
    }
    // A parsed duration written back in whole seconds means the same.
    if let Ok(d) = first
        && d.subsec_nanos() == 0
    {
        assert_eq!(
            idem_duration::parse(&format!("{}s", d.as_secs())).ok(),
            Some(d)
        );
    }
});
