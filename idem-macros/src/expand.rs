//! Rewrites the annotated fn. The signature is re-emitted unchanged; the body becomes one
//! call into `idem_runtime::__private::run` with the key, scope and payload fingerprint
//! evaluated first (before the body moves the arguments) and the original body as an
//! `async move` block. No idempotency logic lives here.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{
    Block, Expr, FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Stmt, Type,
    TypeParamBound,
};

use crate::args::{Args, CacheErrors, OnConflict};

pub(crate) fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let e = syn::Error::new(
                Span::call_site(),
                "`#[idempotent]` goes on an `async fn` with a body (a free fn, a method, or a trait impl's method; not a trait's declaration)",
            );
            return with_item(e, item);
        }
    };
    let args = match syn::parse2::<Args>(attr).and_then(|a| a.validate().map(|()| a)) {
        Ok(args) => args,
        Err(e) => return with_item(e, item),
    };
    match expand(&args, func) {
        Ok(tokens) => tokens,
        // The user's fn is still emitted so that the one error is all the user sees, and
        // IDEs keep resolving the fn.
        Err(e) => with_item(e, item),
    }
}

fn with_item(err: syn::Error, item: TokenStream) -> TokenStream {
    let err = err.to_compile_error();
    quote!(#err #item)
}

/// The shape `#[async_trait]` leaves behind: a non-async fn whose body ends in
/// `Box::pin(async move { .. })`, returning `Pin<Box<dyn Future<Output = R> + ..>>`.
struct AsyncTraitShape<'a> {
    block: &'a mut Block,
    output: Type,
}

fn async_trait_shape(func: &mut ItemFn) -> Option<AsyncTraitShape<'_>> {
    let ReturnType::Type(_, ret) = &func.sig.output else {
        return None;
    };
    let output = future_output(ret)?;
    let Some(Stmt::Expr(Expr::Call(call), None)) = func.block.stmts.last_mut() else {
        return None;
    };
    let Expr::Path(path) = &*call.func else {
        return None;
    };
    if path.path.segments.last().map(|s| s.ident.to_string()) != Some("pin".to_string())
        || call.args.len() != 1
    {
        return None;
    }
    match call.args.first_mut() {
        Some(Expr::Async(block)) if block.capture.is_some() => Some(AsyncTraitShape {
            block: &mut block.block,
            output,
        }),
        _ => None,
    }
}

/// Whether a return type is `impl Future<..>` (or `impl Future + Send ..`).
fn returns_impl_future(ty: &Type) -> bool {
    let Type::ImplTrait(imp) = ty else {
        return false;
    };
    imp.bounds.iter().any(|b| {
        matches!(b, TypeParamBound::Trait(t)
            if t.path.segments.last().is_some_and(|s| s.ident == "Future"))
    })
}

/// `R` in `Pin<Box<dyn Future<Output = R> + Send + 'a>>`.
fn future_output(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let PathArguments::AngleBracketed(pin_args) = &p.path.segments.last()?.arguments else {
        return None;
    };
    let Some(GenericArgument::Type(Type::Path(boxed))) = pin_args.args.first() else {
        return None;
    };
    let PathArguments::AngleBracketed(box_args) = &boxed.path.segments.last()?.arguments else {
        return None;
    };
    let Some(GenericArgument::Type(Type::TraitObject(dyn_future))) = box_args.args.first() else {
        return None;
    };
    dyn_future.bounds.iter().find_map(|bound| {
        let TypeParamBound::Trait(t) = bound else {
            return None;
        };
        let PathArguments::AngleBracketed(a) = &t.path.segments.last()?.arguments else {
            return None;
        };
        a.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}

fn expand(args: &Args, mut func: ItemFn) -> syn::Result<TokenStream> {
    if let Some(c) = &func.sig.constness {
        return Err(syn::Error::new_spanned(
            c,
            "`#[idempotent]` cannot be used on a `const fn`: it needs an `async fn`",
        ));
    }
    let params = Params::collect(&func, args)?;
    if func.sig.asyncness.is_some() {
        let ret = match &func.sig.output {
            ReturnType::Type(_, ty) => (**ty).clone(),
            ReturnType::Default => {
                return Err(syn::Error::new_spanned(
                    &func.sig,
                    "`#[idempotent]` fns must return `Result<T, E>` where `T: Serialize + DeserializeOwned` and `E: From<idem_runtime::Error>`; this fn returns `()`",
                ));
            }
        };
        let body = &func.block;
        let stmts = &body.stmts;
        let fake_return = quote_spanned! {ret.span()=>
            #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::needless_return, clippy::unreachable)]
            if false {
                let __idem_fake_return: #ret = ::core::unreachable!();
                return __idem_fake_return;
            }
        };
        let inner = quote!(async move { #fake_return #(#stmts)* });
        let new_body = wrap(args, &params, &ret, inner);
        *func.block = syn::parse2(quote!({ #new_body }))?;
        return Ok(func.into_token_stream());
    }
    if let ReturnType::Type(_, ret) = &func.sig.output
        && returns_impl_future(ret)
    {
        return Err(syn::Error::new_spanned(
            ret,
            "`#[idempotent]` requires an `async fn`: a fn returning `impl Future` hands its future to the caller unopened, so idem cannot reserve the key before it runs and record its result after; write it as `async fn .. -> Result<T, E>`",
        ));
    }
    let Some(shape) = async_trait_shape(&mut func) else {
        let span = func.sig.fn_token;
        return Err(syn::Error::new_spanned(
            span,
            "`#[idempotent]` requires an `async fn`",
        ));
    };
    let stmts = &shape.block.stmts;
    // `#[async_trait]` rebinds every argument inside its block (`let id = id;`); one used only
    // by the key now looks unused there, so that rebinding must not warn.
    let inner = quote!({
        #[allow(unused_variables)]
        let __idem_body = async move { #(#stmts)* };
        __idem_body
    });
    let new_body = wrap(args, &params, &shape.output, inner);
    *shape.block = syn::parse2(quote!({ #new_body }))?;
    Ok(func.into_token_stream())
}

/// The arguments that make up the payload fingerprint, and the types that tell one
/// instantiation of the fn from another.
struct Params {
    fingerprinted: Vec<Ident>,
    has_receiver: bool,
    type_params: Vec<Ident>,
}

impl Params {
    fn collect(func: &ItemFn, args: &Args) -> syn::Result<Params> {
        let mut all = Vec::new();
        for input in &func.sig.inputs {
            if let FnArg::Typed(pt) = input {
                bindings(&pt.pat, &mut all);
            }
        }
        // async-trait renames `self` to `__self` and keeps it as a binding; it is never payload.
        all.retain(|i| i != "__self");
        let mut errors: Option<syn::Error> = None;
        let skipped: Vec<&Ident> = args.skip.iter().flatten().collect();
        for s in &skipped {
            if !all.iter().any(|a| a == *s) {
                let e = syn::Error::new_spanned(
                    s,
                    format!("`#[idempotent]`: `skip({s})` names no argument of this fn"),
                );
                match &mut errors {
                    Some(all) => all.combine(e),
                    None => errors = Some(e),
                }
            }
        }
        if let Some(tx) = &args.tx
            && !all.iter().any(|a| a == tx)
        {
            let e = syn::Error::new_spanned(
                tx,
                format!(
                    "`#[idempotent]`: `tx = {tx}` names no argument of this fn; it must name the `&mut sqlx::Transaction` argument"
                ),
            );
            match &mut errors {
                Some(all) => all.combine(e),
                None => errors = Some(e),
            }
        }
        if let Some(e) = errors {
            return Err(e);
        }
        // `runtime = idem` names the handle; it is never part of the payload.
        let runtime_arg = match &args.runtime {
            Some(Expr::Path(p)) => p.path.get_ident().cloned(),
            _ => None,
        };
        let fingerprinted = if args.skip_all || args.fingerprint.is_some() {
            Vec::new()
        } else {
            all.into_iter()
                .filter(|a| {
                    !skipped.contains(&a)
                        && Some(a) != runtime_arg.as_ref()
                        && Some(a) != args.tx.as_ref()
                })
                .collect()
        };
        Ok(Params {
            fingerprinted,
            has_receiver: func.sig.receiver().is_some(),
            type_params: func
                .sig
                .generics
                .type_params()
                .map(|t| t.ident.clone())
                .collect(),
        })
    }
}

/// The names a parameter pattern binds (`req`, or `a` and `b` in `(a, b)`, or `body` in
/// `Json(body)`).
fn bindings(pat: &Pat, out: &mut Vec<Ident>) {
    match pat {
        Pat::Ident(p) => {
            if let Some((_, sub)) = &p.subpat {
                bindings(sub, out);
            }
            out.push(p.ident.clone());
        }
        Pat::Reference(p) => bindings(&p.pat, out),
        Pat::Tuple(p) => p.elems.iter().for_each(|e| bindings(e, out)),
        Pat::TupleStruct(p) => p.elems.iter().for_each(|e| bindings(e, out)),
        Pat::Struct(p) => p.fields.iter().for_each(|f| bindings(&f.pat, out)),
        Pat::Slice(p) => p.elems.iter().for_each(|e| bindings(e, out)),
        Pat::Type(p) => bindings(&p.pat, out),
        Pat::Paren(p) => bindings(&p.pat, out),
        _ => {}
    }
}

/// Where `__private` is, every token carrying a span: an error about a call into the runtime
/// is then reported on the user's tokens that caused it.
struct Private<'a>(&'a Option<syn::Path>);

impl Private<'_> {
    fn at(&self, span: Span) -> TokenStream {
        match self.0 {
            Some(path) => quote_spanned!(span=> #path::__private),
            None => quote_spanned!(span=> ::idem_runtime::__private),
        }
    }
}

/// `{ static SPEC; fn marker; let runtime = ..; let call = ..; run(&SPEC, marker, types,
/// runtime, call, inner).await }`
fn wrap(args: &Args, params: &Params, ret: &Type, inner: TokenStream) -> TokenStream {
    let private = Private(&args.krate);
    let here = private.at(Span::call_site());
    let spec = Ident::new("__IDEM_SPEC", Span::mixed_site());
    let marker = Ident::new("__idem_here", Span::call_site());
    let call = Ident::new("__idem_call", Span::mixed_site());
    let runtime = Ident::new("__idem_runtime", Span::mixed_site());
    let spec_init = spec_init(args, &here);
    let call_init = call_init(args, params, &private);
    let runtime_init = match &args.runtime {
        Some(r) => {
            let at = private.at(r.span());
            quote_spanned!(r.span()=> ::core::option::Option::Some(#at::runtime(&(#r))))
        }
        None => quote!(::core::option::Option::None),
    };
    let types = instantiation_types(args, params);
    let head = quote!(&#spec, #marker, &[#(#types),*], #runtime, #call);
    let run = match &args.tx {
        None => leased_call(args, &private, ret, head, inner),
        Some(tx) => transactional_call(args, &private, ret, head, tx, inner),
    };
    quote! {
        static #spec: #here::Spec = #spec_init;
        fn #marker() {}
        let #runtime = #runtime_init;
        let #call = #call_init;
        #run
    }
}

/// The `Spec` the attribute's arguments make, as a `const` expression.
fn spec_init(args: &Args, private: &TokenStream) -> TokenStream {
    let mut spec = quote!(#private::Spec::new());
    if let Some(name) = &args.name {
        spec.extend(quote!(.name(#name)));
    }
    for (method, value) in [
        ("ttl_ms", &args.ttl),
        ("lease_ms", &args.lease),
        ("wait_ms", &args.wait),
    ] {
        if let Some(d) = value {
            let method = format_ident!("{method}");
            let ms = d.millis;
            spec.extend(quote!(.#method(#ms)));
        }
    }
    if args.on_conflict == Some(OnConflict::Reject) {
        spec.extend(quote!(.reject()));
    }
    if let Some(v) = args.version {
        spec.extend(quote!(.version(#v)));
    }
    if args.optional {
        spec.extend(quote!(.optional()));
    }
    spec
}

/// `Call { key, scope, payload }`, each evaluated from the fn's arguments before the body
/// moves them.
fn call_init(args: &Args, params: &Params, private: &Private<'_>) -> TokenStream {
    let here = private.at(Span::call_site());
    let fp = Ident::new("__idem_fp", Span::mixed_site());
    let key = args
        .key
        .as_ref()
        .map(|k| quote_spanned!(k.span()=> #here::key(&(#k))));
    let scope = match &args.scope {
        Some(s) => quote_spanned!(s.span()=> #here::scope(&(#s))),
        None => quote!(#here::Scope::Unscoped),
    };
    let payload = match (&args.fingerprint, args.skip_all) {
        (Some(f), _) => quote_spanned!(f.span()=> #here::Payload::of(&(#f))),
        (None, true) => quote!(#here::Payload::Unchecked),
        (None, false) => {
            let feeds = params
                .fingerprinted
                .iter()
                .map(|a| quote_spanned!(a.span()=> #fp.arg(&#a);));
            quote!({
                let mut #fp = #here::Fingerprinter::new();
                #(#feeds)*
                #here::Payload::from(#fp.finish())
            })
        }
    };
    quote!(#here::Call { key: #key, scope: #scope, payload: #payload })
}

/// `Self` and the type parameters name the instantiation: a trait's default method run for
/// two implementers (or a generic fn for two types) keeps two sets of records. An explicit
/// `name` is the whole namespace.
fn instantiation_types(args: &Args, params: &Params) -> Vec<TokenStream> {
    let mut types = Vec::new();
    if args.name.is_none() {
        if params.has_receiver {
            types.push(quote!(::core::any::type_name::<Self>()));
        }
        for t in &params.type_params {
            types.push(quote!(::core::any::type_name::<#t>()));
        }
    }
    types
}

/// `run(..head.., inner).await`: the entry point is spanned on the return type, so an
/// unsupported return type is reported there, with the message of `IdempotentOutput`.
fn leased_call(
    args: &Args,
    private: &Private<'_>,
    ret: &Type,
    head: TokenStream,
    inner: TokenStream,
) -> TokenStream {
    let ret_span = ret.span();
    let at = private.at(ret_span);
    let entry = match args.cache_errors {
        CacheErrors::None => quote_spanned!(ret_span=> #at::run),
        CacheErrors::All => quote_spanned!(ret_span=> #at::run_caching_errors),
        CacheErrors::Final => quote_spanned!(ret_span=> #at::run_caching_final_errors),
    };
    quote_spanned!(ret_span=> #entry(#head, #inner).await)
}

/// `tx_begin`, the body, `tx_finish`: the transaction is used before the body (reserve), by
/// the body, and after it (record the result), so the body gets a reborrow under the
/// argument's own name.
fn transactional_call(
    args: &Args,
    private: &Private<'_>,
    ret: &Type,
    head: TokenStream,
    tx: &Ident,
    inner: TokenStream,
) -> TokenStream {
    let ret_span = ret.span();
    let here = private.at(Span::call_site());
    let at = private.at(ret_span);
    let conn = Ident::new("__idem_tx", Span::mixed_site());
    let token = Ident::new("__idem_token", Span::mixed_site());
    let out = Ident::new("__idem_out", Span::mixed_site());
    let codec = match args.cache_errors {
        CacheErrors::None => quote!(#here::ValuesOnly),
        CacheErrors::All => quote!(#here::ValuesAndErrors),
        CacheErrors::Final => quote!(#here::ValuesAndFinalErrors),
    };
    quote_spanned! {ret_span=>
        let #conn = #tx;
        match #at::tx_begin(#head, &mut *#conn, #codec).await {
            #here::TxBegin::Done(#out) => #out,
            #here::TxBegin::Run(#token) => {
                let #out = {
                    let #tx = &mut *#conn;
                    (#inner).await
                };
                #at::tx_finish(#token, &mut *#conn, #out).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        idempotent(
            attr.parse().expect("attr tokens"),
            item.parse().expect("item tokens"),
        )
        .to_string()
    }

    #[test]
    fn the_signature_is_unchanged() {
        let out = expand_str(
            "key = id",
            "pub async fn charge(db: &Db, id: u64) -> Result<u64, E> { Ok(id) }",
        );
        assert!(
            out.starts_with("pub async fn charge (db : & Db , id : u64) -> Result < u64 , E >"),
            "{out}"
        );
        assert!(out.contains("__private :: run"), "{out}");
    }

    #[test]
    fn skipped_and_runtime_arguments_are_not_fingerprinted() {
        let out = expand_str(
            "key = id, skip(db), runtime = idem",
            "async fn f(idem: &Idem, db: &Db, id: u64, req: Req) -> Result<u64, E> { Ok(id) }",
        );
        assert!(out.contains("__idem_fp . arg (& id)"), "{out}");
        assert!(out.contains("__idem_fp . arg (& req)"), "{out}");
        assert!(
            !out.contains("arg (& db)") && !out.contains("arg (& idem)"),
            "{out}"
        );
    }

    #[test]
    fn destructured_arguments_fingerprint_their_bindings() {
        let out = expand_str(
            "key = body.id",
            "async fn f(Json(body): Json<Req>, (a, _b): (u8, u8)) -> Result<u64, E> { Ok(1) }",
        );
        for name in ["body", "a", "_b"] {
            assert!(out.contains(&format!("arg (& {name})")), "{name}: {out}");
        }
    }

    #[test]
    fn errors_keep_the_fn() {
        let out = expand_str("ttl = \"5m\"", "async fn f() -> Result<u8, E> { Ok(1) }");
        assert!(out.contains("compile_error"), "{out}");
        assert!(out.contains("async fn f"), "{out}");
    }

    #[test]
    fn non_async_fns_are_refused() {
        let out = expand_str("key = k", "fn f(k: u8) -> Result<u8, E> { Ok(k) }");
        assert!(out.contains("requires an `async fn`"), "{out}");
    }

    #[test]
    fn async_trait_output_is_found() {
        let out = expand_str(
            "key = k",
            "fn f<'a, 'async_trait>(&'a self, k: u8) -> ::core::pin::Pin<Box<dyn ::core::future::Future<Output = Result<u8, E>> + ::core::marker::Send + 'async_trait>> where 'a: 'async_trait { Box::pin(async move { let __self = self; let k = k; let __ret: Result<u8, E> = { Ok(k) }; __ret }) }",
        );
        assert!(out.contains("Box :: pin (async move {"), "{out}");
        assert!(out.contains("__private :: run"), "{out}");
        assert!(!out.contains("arg (& __self)"), "{out}");
    }
}
