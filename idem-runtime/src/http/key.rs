//! The `Idempotency-Key` header: one line, a structured-field string or a bare value.

use axum::http::HeaderMap;
use axum::http::header::{HeaderName, HeaderValue};

/// The key from the request's key header.
///
/// The draft defines the field as one structured-field string (RFC 8941: `"..."`, with `\"`
/// and `\\` as the only escapes); a bare value is accepted too, since most clients send one
/// (`Idempotency-Key: 8e0f..`). Either way the key is 1 to 255 printable ASCII characters.
/// More than one header line is refused: RFC 9110 reads several lines as one comma-joined
/// value, which a proxy may or may not have merged, so the key would depend on the path the
/// request took. For the same reason a bare value may not contain a comma.
pub(super) fn key_from(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<String>, &'static str> {
    let mut lines = headers.get_all(name).iter();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        return Err("the request has more than one idempotency key header line; send exactly one");
    }
    key_of(first).map(Some)
}

fn key_of(value: &HeaderValue) -> Result<String, &'static str> {
    let s = value
        .to_str()
        .map_err(|_| "the key must be printable ASCII")?
        .trim_matches([' ', '\t']);
    let key = match s.strip_prefix('"') {
        Some(quoted) => sf_string(quoted)?,
        None if s.contains(',') => {
            return Err(
                "a bare key may not contain `,` (it reads as a list of keys); send one key, quoted as a structured-field string if it needs a comma",
            );
        }
        None if s.contains('"') => return Err("the key has a stray `\"`"),
        None => s.to_owned(),
    };
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.len() > 255 {
        return Err("the key is longer than 255 characters");
    }
    Ok(key)
}

/// The rest of an RFC 8941 sf-string after its opening quote.
fn sf_string(rest: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    loop {
        match chars.next() {
            None => return Err("the quoted key has no closing `\"`"),
            Some('"') => break,
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => out.push(c),
                _ => return Err("a quoted key may only escape `\"` and `\\`"),
            },
            Some(c) if (' '..='~').contains(&c) => out.push(c),
            Some(_) => return Err("the key must be printable ASCII"),
        }
    }
    if !chars.as_str().trim_matches([' ', '\t']).is_empty() {
        return Err(
            "nothing may follow the quoted key (structured-field parameters are not supported)",
        );
    }
    Ok(out)
}
