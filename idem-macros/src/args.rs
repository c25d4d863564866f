//! The attribute's arguments: parsing and the checks that need nothing but the arguments.

use std::time::Duration;

use proc_macro2::Span;
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitBool, LitInt, LitStr, Path, Token};

mod kw {
    syn::custom_keyword!(key);
    syn::custom_keyword!(optional);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(scope);
    syn::custom_keyword!(skip);
    syn::custom_keyword!(skip_all);
    syn::custom_keyword!(fingerprint);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(on_conflict);
    syn::custom_keyword!(wait);
    syn::custom_keyword!(cache_errors);
    syn::custom_keyword!(version);
    syn::custom_keyword!(runtime);
    syn::custom_keyword!(name);
    syn::custom_keyword!(tx);
}

const VALID: &str = "`key`, `optional`, `ttl`, `scope`, `skip`, `skip_all`, `fingerprint`, `lease`, `on_conflict`, `wait`, `cache_errors`, `version`, `runtime`, `name`, `tx`, `crate`";

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
    pub(crate) reject: Option<bool>,
    pub(crate) wait: Option<DurationArg>,
    pub(crate) cache_errors: bool,
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
                ("on_conflict", self.reject.is_some()),
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
        if let (Some(true), Some(_)) = (self.reject, &self.wait) {
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
    fn parse_one(&mut self, input: ParseStream<'_>) -> syn::Result<()> {
        let lookahead = input.lookahead1();
        if lookahead.peek(kw::key) {
            let k = input.parse::<kw::key>()?;
            self.set_once("key", k.span)?;
            input.parse::<Token![=]>()?;
            self.key = Some(input.parse()?);
        } else if lookahead.peek(kw::optional) {
            let k = input.parse::<kw::optional>()?;
            self.set_once("optional", k.span)?;
            self.optional = parse_flag(input)?;
        } else if lookahead.peek(kw::ttl) {
            let k = input.parse::<kw::ttl>()?;
            self.set_once("ttl", k.span)?;
            self.ttl = Some(parse_duration(input, "ttl")?);
        } else if lookahead.peek(kw::scope) {
            let k = input.parse::<kw::scope>()?;
            self.set_once("scope", k.span)?;
            input.parse::<Token![=]>()?;
            self.scope = Some(input.parse()?);
        } else if lookahead.peek(kw::skip_all) {
            let k = input.parse::<kw::skip_all>()?;
            self.set_once("skip_all", k.span)?;
            self.skip_all = true;
        } else if lookahead.peek(kw::skip) {
            let k = input.parse::<kw::skip>()?;
            self.set_once("skip", k.span)?;
            let content;
            syn::parenthesized!(content in input);
            let names = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
            self.skip = Some(names.into_iter().collect());
        } else if lookahead.peek(kw::fingerprint) {
            let k = input.parse::<kw::fingerprint>()?;
            self.set_once("fingerprint", k.span)?;
            input.parse::<Token![=]>()?;
            self.fingerprint = Some(input.parse()?);
        } else if lookahead.peek(kw::lease) {
            let k = input.parse::<kw::lease>()?;
            self.set_once("lease", k.span)?;
            self.lease = Some(parse_duration(input, "lease")?);
        } else if lookahead.peek(kw::on_conflict) {
            let k = input.parse::<kw::on_conflict>()?;
            self.set_once("on_conflict", k.span)?;
            input.parse::<Token![=]>()?;
            let lit: LitStr = input.parse()?;
            self.reject = Some(match lit.value().as_str() {
                "wait" => false,
                "reject" => true,
                other => {
                    return Err(syn::Error::new(
                        lit.span(),
                        format!(
                            "`#[idempotent]`: `on_conflict` is \"wait\" or \"reject\", not {other:?}"
                        ),
                    ));
                }
            });
        } else if lookahead.peek(kw::wait) {
            let k = input.parse::<kw::wait>()?;
            self.set_once("wait", k.span)?;
            self.wait = Some(parse_duration(input, "wait")?);
        } else if lookahead.peek(kw::cache_errors) {
            let k = input.parse::<kw::cache_errors>()?;
            self.set_once("cache_errors", k.span)?;
            self.cache_errors = parse_flag(input)?;
        } else if lookahead.peek(kw::version) {
            let k = input.parse::<kw::version>()?;
            self.set_once("version", k.span)?;
            input.parse::<Token![=]>()?;
            let lit: LitInt = input.parse()?;
            self.version = Some(lit.base10_parse::<u32>().map_err(|_| {
                syn::Error::new(
                    lit.span(),
                    "`#[idempotent]`: `version` is a whole number from 0 to 4294967295",
                )
            })?);
        } else if lookahead.peek(kw::runtime) {
            let k = input.parse::<kw::runtime>()?;
            self.set_once("runtime", k.span)?;
            input.parse::<Token![=]>()?;
            self.runtime = Some(input.parse()?);
        } else if lookahead.peek(kw::name) {
            let k = input.parse::<kw::name>()?;
            self.set_once("name", k.span)?;
            input.parse::<Token![=]>()?;
            let lit: LitStr = input.parse()?;
            if lit.value().trim().is_empty() {
                return Err(syn::Error::new(
                    lit.span(),
                    "`#[idempotent]`: `name` must not be empty",
                ));
            }
            self.name = Some(lit);
        } else if lookahead.peek(kw::tx) {
            let k = input.parse::<kw::tx>()?;
            self.set_once("tx", k.span)?;
            input.parse::<Token![=]>()?;
            self.tx = Some(input.parse().map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "`#[idempotent]`: `tx` names the fn's `&mut sqlx::Transaction` argument, e.g. `tx = tx`",
                )
            })?);
        } else if lookahead.peek(Token![crate]) {
            let k = input.parse::<Token![crate]>()?;
            self.set_once("crate", k.span)?;
            input.parse::<Token![=]>()?;
            self.krate = Some(input.parse()?);
        } else {
            let unknown: proc_macro2::TokenTree = input.parse()?;
            return Err(syn::Error::new_spanned(
                &unknown,
                format!(
                    "`#[idempotent]`: unknown argument `{}`; expected one of {VALID}",
                    unknown.to_token_stream()
                ),
            ));
        }
        Ok(())
    }
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
        assert!(a.key.is_some() && a.optional && a.scope.is_some() && a.cache_errors);
        assert_eq!(a.ttl.map(|d| d.millis), Some(300_000));
        assert_eq!(a.lease.map(|d| d.millis), Some(30_000));
        assert_eq!(a.wait.map(|d| d.millis), Some(2_000));
        assert_eq!(a.version, Some(3));
        assert_eq!(a.reject, Some(false));
        assert_eq!(a.skip.map(|s| s.len()), Some(2));
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
