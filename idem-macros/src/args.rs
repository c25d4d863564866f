//! The attribute's arguments: parsing and the checks that need nothing but the arguments.

use std::time::Duration;

use proc_macro2::Span;
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitBool, LitInt, LitStr, Path, Token};

/// Every argument, in the order the "expected one of" list names them.
const ARGUMENTS: [&str; 16] = [
    "key",
    "optional",
    "ttl",
    "scope",
    "skip",
    "skip_all",
    "fingerprint",
    "lease",
    "on_conflict",
    "wait",
    "cache_errors",
    "version",
    "runtime",
    "name",
    "tx",
    "crate",
];

/// What a duplicate does while the first call runs: `on_conflict = "wait" | "reject"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnConflict {
    Wait,
    Reject,
}

/// Which errors are stored and replayed: `cache_errors = true | false | "final"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum CacheErrors {
    /// None: an `Err` releases the key.
    #[default]
    None,
    /// Every `Err` (`cache_errors = true`).
    All,
    /// The errors whose `IdempotentError::is_final` is true (`cache_errors = "final"`).
    Final,
}

/// A duration literal, already checked.
pub(crate) struct DurationArg {
    pub(crate) millis: u64,
}

/// Everything the attribute says, each argument at most once.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Expr>,
    pub(crate) optional: bool,
    pub(crate) ttl: Option<DurationArg>,
    pub(crate) scope: Option<Expr>,
    pub(crate) skip: Option<Vec<Ident>>,
    pub(crate) skip_all: bool,
    pub(crate) fingerprint: Option<Expr>,
    pub(crate) lease: Option<DurationArg>,
    pub(crate) on_conflict: Option<OnConflict>,
    pub(crate) wait: Option<DurationArg>,
    pub(crate) cache_errors: CacheErrors,
    pub(crate) version: Option<u32>,
    pub(crate) runtime: Option<Expr>,
    pub(crate) name: Option<LitStr>,
    pub(crate) tx: Option<Ident>,
    pub(crate) krate: Option<Path>,
    seen: Vec<String>,
}

impl Args {
    /// Records that `name` was given, failing on the second time.
    fn set_once(&mut self, name: &str, span: Span) -> syn::Result<()> {
        if self.seen.iter().any(|s| s == name) {
            return Err(syn::Error::new(
                span,
                format!("`#[idempotent]`: `{name}` is given more than once"),
            ));
        }
        self.seen.push(name.to_string());
        Ok(())
    }

    /// Checks that need the arguments together.
    pub(crate) fn validate(&self) -> syn::Result<()> {
        let mut errors: Option<syn::Error> = None;
        let mut push = |e: syn::Error| match &mut errors {
            Some(all) => all.combine(e),
            None => errors = Some(e),
        };
        if self.key.is_none() {
            push(syn::Error::new(
                Span::call_site(),
                "`#[idempotent]` requires `key = <expr>`: the idempotency key, e.g. `key = req.request_id`",
            ));
        }
        if self.skip_all && self.skip.is_some() {
            push(syn::Error::new(
                Span::call_site(),
                "`#[idempotent]`: `skip_all` already skips every argument; remove `skip(..)`",
            ));
        }
        if let (Some(fp), true) = (&self.fingerprint, self.skip_all || self.skip.is_some()) {
            push(syn::Error::new_spanned(
                fp,
                "`#[idempotent]`: `fingerprint = ..` replaces the argument fingerprint, so `skip`/`skip_all` have no effect; remove them",
            ));
        }
        if let Some(tx) = &self.tx {
            let leased = [
                ("lease", self.lease.is_some()),
                ("on_conflict", self.on_conflict.is_some()),
                ("wait", self.wait.is_some()),
            ];
            for (arg, given) in leased {
                if given {
                    push(syn::Error::new_spanned(
                        tx,
                        format!(
                            "`#[idempotent]`: `{arg}` has no effect with `tx = ..`: a transactional call holds no lease, and a duplicate waits on the database's row lock; remove `{arg}`"
                        ),
                    ));
                }
            }
        }
        if let (Some(OnConflict::Reject), Some(_)) = (self.on_conflict, &self.wait) {
            push(syn::Error::new(
                Span::call_site(),
                "`#[idempotent]`: `wait` has no effect with `on_conflict = \"reject\"`; remove one of them",
            ));
        }
        match errors {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut args = Args::default();
        while !input.is_empty() {
            args.parse_one(input)?;
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(args)
    }
}

impl Args {
    /// One `name`, `name = value` or `name(..)` argument.
    fn parse_one(&mut self, input: ParseStream<'_>) -> syn::Result<()> {
        let known = input.fork().call(Ident::parse_any).ok().filter(|name| {
            let name = name.to_string();
            ARGUMENTS.contains(&name.as_str())
        });
        let Some(name) = known else {
            let unknown: proc_macro2::TokenTree = input.parse()?;
            let valid: Vec<String> = ARGUMENTS.iter().map(|a| format!("`{a}`")).collect();
            return Err(syn::Error::new_spanned(
                &unknown,
                format!(
                    "`#[idempotent]`: unknown argument `{}`; expected one of {}",
                    unknown.to_token_stream(),
                    valid.join(", ")
                ),
            ));
        };
        input.call(Ident::parse_any)?;
        let arg = name.to_string();
        self.set_once(&arg, name.span())?;
        match arg.as_str() {
            "key" => self.key = Some(parse_value(input)?),
            "scope" => self.scope = Some(parse_value(input)?),
            "fingerprint" => self.fingerprint = Some(parse_value(input)?),
            "runtime" => self.runtime = Some(parse_value(input)?),
            "crate" => self.krate = Some(parse_value(input)?),
            "optional" => self.optional = parse_flag(input)?,
            "cache_errors" => self.cache_errors = parse_cache_errors(input)?,
            "skip_all" => self.skip_all = true,
            "ttl" => self.ttl = Some(parse_duration(input, "ttl")?),
            "lease" => self.lease = Some(parse_duration(input, "lease")?),
            "wait" => self.wait = Some(parse_duration(input, "wait")?),
            "skip" => {
                if !input.peek(syn::token::Paren) {
                    return Err(input.error(
                        "`#[idempotent]`: `skip` takes the arguments to leave out of the fingerprint in parentheses, e.g. `skip(db, client)`",
                    ));
                }
                let content;
                syn::parenthesized!(content in input);
                let names = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
                self.skip = Some(names.into_iter().collect());
            }
            "on_conflict" => self.on_conflict = Some(parse_on_conflict(input)?),
            "version" => self.version = Some(parse_version(input)?),
            "name" => self.name = Some(parse_name(input)?),
            _ => self.tx = Some(parse_tx(input)?),
        }
        Ok(())
    }
}

/// `= <value>`.
fn parse_value<T: Parse>(input: ParseStream<'_>) -> syn::Result<T> {
    input.parse::<Token![=]>()?;
    input.parse()
}

/// `= "wait"` or `= "reject"`.
fn parse_on_conflict(input: ParseStream<'_>) -> syn::Result<OnConflict> {
    let lit: LitStr = parse_value(input)?;
    match lit.value().as_str() {
        "wait" => Ok(OnConflict::Wait),
        "reject" => Ok(OnConflict::Reject),
        other => Err(syn::Error::new(
            lit.span(),
            format!("`#[idempotent]`: `on_conflict` is \"wait\" or \"reject\", not {other:?}"),
        )),
    }
}

/// `= N`, a `u32`.
fn parse_version(input: ParseStream<'_>) -> syn::Result<u32> {
    input.parse::<Token![=]>()?;
    let lit: LitInt = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "`#[idempotent]`: `version` is a whole number, e.g. `version = 2` (no quotes)",
        )
    })?;
    lit.base10_parse::<u32>().map_err(|_| {
        syn::Error::new(
            lit.span(),
            "`#[idempotent]`: `version` is a whole number from 0 to 4294967295",
        )
    })
}

/// `= "record.path"`, not empty.
fn parse_name(input: ParseStream<'_>) -> syn::Result<LitStr> {
    let lit: LitStr = parse_value(input)?;
    if lit.value().trim().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            "`#[idempotent]`: `name` must not be empty",
        ));
    }
    Ok(lit)
}

/// `= tx`, the name of the transaction argument.
fn parse_tx(input: ParseStream<'_>) -> syn::Result<Ident> {
    input.parse::<Token![=]>()?;
    input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "`#[idempotent]`: `tx` names the fn's `&mut sqlx::Transaction` argument, e.g. `tx = tx`",
        )
    })
}

/// A bare `cache_errors`, `= true`, `= false`, or `= "final"`.
fn parse_cache_errors(input: ParseStream<'_>) -> syn::Result<CacheErrors> {
    if input.peek(Token![=]) && input.peek2(LitStr) {
        input.parse::<Token![=]>()?;
        let lit: LitStr = input.parse()?;
        return match lit.value().as_str() {
            "final" => Ok(CacheErrors::Final),
            other => Err(syn::Error::new(
                lit.span(),
                format!(
                    "`#[idempotent]`: `cache_errors` is `true` (every error), `false`, or \"final\" (the errors `IdempotentError::is_final` calls final), not {other:?}"
                ),
            )),
        };
    }
    Ok(match parse_flag(input)? {
        true => CacheErrors::All,
        false => CacheErrors::None,
    })
}

/// A bare flag (`optional`) or `flag = true/false`.
fn parse_flag(input: ParseStream<'_>) -> syn::Result<bool> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Ok(input.parse::<LitBool>()?.value)
    } else {
        Ok(true)
    }
}

/// `= "PT5M"`, checked now so a bad literal is a compile error on the literal.
fn parse_duration(input: ParseStream<'_>, what: &str) -> syn::Result<DurationArg> {
    input.parse::<Token![=]>()?;
    let lit: LitStr = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`#[idempotent]`: `{what}` is a string literal, e.g. `{what} = \"PT5M\"` or `{what} = \"5m\"`"),
        )
    })?;
    let parsed: Duration = idem_duration::parse(&lit.value()).map_err(|e| {
        syn::Error::new(
            lit.span(),
            format!("`#[idempotent]`: invalid `{what}` {:?}: {e}", lit.value()),
        )
    })?;
    // Sub-millisecond parts cannot be written in either spelling; round up to be safe.
    let millis = u64::try_from(parsed.as_millis()).unwrap_or(u64::MAX).max(1);
    Ok(DurationArg { millis })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> syn::Result<Args> {
        let args: Args = syn::parse_str(s)?;
        args.validate()?;
        Ok(args)
    }

    fn err(s: &str) -> String {
        match parse(s) {
            Ok(_) => panic!("{s} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_argument_parses() {
        let a = parse(
            r#"key = req.id, optional, ttl = "PT5M", scope = tenant, skip(db, cache),
               lease = "30s", on_conflict = "wait", wait = "PT2S", cache_errors = true,
               version = 3, runtime = &idem, name = "orders.create", crate = ::my_idem"#,
        )
        .expect("parses");
        assert!(a.key.is_some() && a.optional && a.scope.is_some());
        assert_eq!(a.cache_errors, CacheErrors::All);
        assert_eq!(a.ttl.map(|d| d.millis), Some(300_000));
        assert_eq!(a.lease.map(|d| d.millis), Some(30_000));
        assert_eq!(a.wait.map(|d| d.millis), Some(2_000));
        assert_eq!(a.version, Some(3));
        assert_eq!(a.on_conflict, Some(OnConflict::Wait));
        assert_eq!(a.skip.map(|s| s.len()), Some(2));
    }

    #[test]
    fn cache_errors_takes_a_flag_or_final() {
        let policy = |s: &str| parse(s).map(|a| a.cache_errors).map_err(|e| e.to_string());
        assert_eq!(policy("key = k"), Ok(CacheErrors::None));
        assert_eq!(policy("key = k, cache_errors"), Ok(CacheErrors::All));
        assert_eq!(policy("key = k, cache_errors = true"), Ok(CacheErrors::All));
        assert_eq!(
            policy("key = k, cache_errors = false"),
            Ok(CacheErrors::None)
        );
        assert_eq!(
            policy(r#"key = k, cache_errors = "final""#),
            Ok(CacheErrors::Final)
        );
        let e = err(r#"key = k, cache_errors = "transient""#);
        assert!(e.contains(r#""final""#) && e.contains("transient"), "{e}");
    }

    #[test]
    fn key_is_required() {
        assert!(err(r#"ttl = "PT5M""#).contains("requires `key = <expr>`"));
    }

    #[test]
    fn unknown_arguments_list_the_valid_ones() {
        let e = err("key = k, tll = \"5m\"");
        assert!(
            e.contains("unknown argument `tll`") && e.contains("`ttl`"),
            "{e}"
        );
    }

    #[test]
    fn duplicates_are_refused_for_every_argument() {
        for dup in [
            "key = a, key = b",
            "key = a, ttl = \"5m\", ttl = \"6m\"",
            "key = a, optional, optional",
            "key = a, skip(x), skip(y)",
            "key = a, version = 1, version = 2",
            "key = a, crate = x, crate = y",
        ] {
            assert!(err(dup).contains("more than once"), "{dup}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_the_reason() {
        assert!(err(r#"key = k, ttl = "P1M""#).contains("ambiguous"));
        assert!(err(r#"key = k, ttl = "PT0S""#).contains("zero"));
        assert!(err(r#"key = k, lease = "soon""#).contains("invalid `lease`"));
        assert!(err(r#"key = k, ttl = 300"#).contains("string literal"));
    }

    #[test]
    fn conflicting_arguments_are_refused() {
        assert!(err("key = k, skip_all, skip(a)").contains("skip_all"));
        assert!(err("key = k, skip(a), fingerprint = x").contains("fingerprint"));
        assert!(err(r#"key = k, on_conflict = "reject", wait = "1s""#).contains("no effect"));
        assert!(err(r#"key = k, on_conflict = "later""#).contains("\"wait\" or \"reject\""));
    }
}
