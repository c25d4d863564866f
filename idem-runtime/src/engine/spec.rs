//! What one annotated fn says about itself: its [`Spec`] (the attribute's arguments, fixed at
//! compile time) and its [`Site`] (its path, namespaces and metric labels, worked out once on
//! first use).

use std::any::type_name;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use crate::key::Namespace;
use crate::metrics::CallLabels;

/// What a duplicate does while the first call with its key still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum OnConflict {
    /// Wait (bounded by `wait`) for the first call's result.
    Wait,
    /// Fail at once with `InProgress`.
    Reject,
}

/// The attribute's arguments, fixed at compile time, plus what is worked out on first use.
pub struct Spec {
    name: Option<&'static str>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Option<Duration>,
    pub(crate) wait: Option<Duration>,
    pub(crate) on_conflict: OnConflict,
    pub(crate) version: u32,
    pub(crate) optional: bool,
    site: OnceLock<Site>,
}

impl Default for Spec {
    fn default() -> Self {
        Self::new()
    }
}

impl Spec {
    /// A spec with every argument at its default.
    pub const fn new() -> Spec {
        Spec {
            name: None,
            ttl: None,
            lease: None,
            wait: None,
            on_conflict: OnConflict::Wait,
            version: 0,
            optional: false,
            site: OnceLock::new(),
        }
    }

    /// `name = ".."`: the record path, instead of the fn's Rust path.
    pub const fn name(mut self, name: &'static str) -> Spec {
        self.name = Some(name);
        self
    }

    /// `ttl = ".."`, in milliseconds (checked by the macro).
    pub const fn ttl_ms(mut self, ms: u64) -> Spec {
        self.ttl = Some(Duration::from_millis(ms));
        self
    }

    /// `lease = ".."`, in milliseconds.
    pub const fn lease_ms(mut self, ms: u64) -> Spec {
        self.lease = Some(Duration::from_millis(ms));
        self
    }

    /// `wait = ".."`, in milliseconds.
    pub const fn wait_ms(mut self, ms: u64) -> Spec {
        self.wait = Some(Duration::from_millis(ms));
        self
    }

    /// `on_conflict = "reject"`.
    pub const fn reject(mut self) -> Spec {
        self.on_conflict = OnConflict::Reject;
        self
    }

    /// `version = N`.
    pub const fn version(mut self, version: u32) -> Spec {
        self.version = version;
        self
    }

    /// `optional`.
    pub const fn optional(mut self) -> Spec {
        self.optional = true;
        self
    }

    /// The fn's site: its record path is `name = ..`, or the fn's path as Rust prints it,
    /// taken from the type name of a marker fn declared inside the annotated fn (`M`).
    pub(crate) fn site<M>(&'static self) -> &'static Site {
        self.site.get_or_init(|| {
            let path: &'static str = match self.name {
                Some(name) => name,
                None => Box::leak(fn_path(type_name::<M>()).into_boxed_str()),
            };
            Site {
                path,
                unscoped: Namespace::new(path, self.version, None),
                version: self.version,
                by_types: RwLock::default(),
                labels: CallLabels::new(path),
            }
        })
    }
}

/// `crate::module::Type::method::{{closure}}::__idem_here` -> `crate::module::Type::method`.
fn fn_path(marker: &str) -> String {
    let path = marker.strip_suffix("::__idem_here").unwrap_or(marker);
    path.replace("::{{closure}}", "")
}

/// A fn's path and unscoped namespaces, worked out once.
pub(crate) struct Site {
    pub(crate) path: &'static str,
    unscoped: Namespace,
    version: u32,
    /// Unscoped namespaces of generic instantiations and `Self` types, by type names.
    by_types: RwLock<HashMap<Box<[&'static str]>, Namespace>>,
    pub(crate) labels: CallLabels,
}

impl Site {
    /// The namespace for one instantiation and scope. `types` are the type names of `Self`
    /// (for methods) and of the fn's type parameters: a trait's default method run for two
    /// implementers, or a generic fn run for two type arguments, are two fns with two sets
    /// of records.
    pub(crate) fn namespace(&self, types: &[&'static str], scope: Option<&str>) -> Namespace {
        if let Some(scope) = scope {
            return Namespace::new(&self.qualified_path(types), self.version, Some(scope));
        }
        if types.is_empty() {
            return self.unscoped.clone();
        }
        let read = self.by_types.read().unwrap_or_else(|p| p.into_inner());
        if let Some(ns) = read.get(types) {
            return ns.clone();
        }
        drop(read);
        let ns = Namespace::new(&self.qualified_path(types), self.version, None);
        // Bounded by the program's monomorphizations of this fn.
        self.by_types
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(types.into())
            .or_insert(ns)
            .clone()
    }

    /// The fn path with the instantiation's type names: `path[Self, T]`.
    fn qualified_path(&self, types: &[&'static str]) -> Cow<'static, str> {
        if types.is_empty() {
            Cow::Borrowed(self.path)
        } else {
            Cow::Owned(format!("{}[{}]", self.path, types.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_drop_the_marker_and_closures() {
        assert_eq!(
            fn_path("shop::orders::create::__idem_here"),
            "shop::orders::create"
        );
        assert_eq!(
            fn_path("<shop::Email as shop::Handler>::handle::{{closure}}::__idem_here"),
            "<shop::Email as shop::Handler>::handle"
        );
    }
}
