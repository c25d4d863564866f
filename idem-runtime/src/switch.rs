//! The off switch: `IDEM_DISABLED=true`, [`IdemBuilder::disabled`](crate::IdemBuilder::disabled)
//! or `disabled = true` in [`IdemConfig`](crate::IdemConfig) run every body unprotected, for
//! test suites that keep their `#[idempotent]` attributes but want them out of the way.
//!
//! The policy, decided once when the runtime is built:
//! - the environment variable, when set, wins over the code and the config file, so one test
//!   run can turn idem off (or back on) without a rebuild;
//! - a debug build honours the switch, with one warning at startup;
//! - a release build honours it only if the code also said
//!   [`allow_disabled_in_release(true)`](crate::IdemBuilder::allow_disabled_in_release): a
//!   stray variable in a production environment must not turn off the protection against
//!   double charges. Without it the runtime stays on and logs an error saying why.

use crate::Error;

/// The environment variable that turns idem off.
pub const ENV_VAR: &str = "IDEM_DISABLED";

/// What the builder was told about the switch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Switch {
    /// `disabled(..)` in code or `disabled` in the config file.
    pub(crate) disabled: bool,
    /// `allow_disabled_in_release(true)`, in code only.
    pub(crate) allow_in_release: bool,
}

impl Switch {
    /// Whether the runtime runs bodies unprotected, given the value of [`ENV_VAR`] and
    /// whether this is a release build. Logs the decision when idem is off, or asked to be.
    pub(crate) fn decide(self, env: Option<&str>, release: bool) -> Result<bool, Error> {
        let from_env = match parse_env(env) {
            Ok(from_env) => from_env,
            // A release build that may not run disabled ignores the variable anyway: a typo
            // in it must not stop a service from starting.
            Err(e) if release && !self.allow_in_release => {
                tracing::error!(error = %e, "idem: IDEM_DISABLED is ignored in this release build; idempotency stays ON");
                None
            }
            Err(e) => return Err(e),
        };
        let asked = from_env.unwrap_or(self.disabled);
        if !asked {
            return Ok(false);
        }
        let source = if from_env.is_some() {
            "IDEM_DISABLED"
        } else {
            "the `disabled` setting"
        };
        if release && !self.allow_in_release {
            tracing::error!(
                source,
                "idem: asked to run disabled in a release build, which needs `allow_disabled_in_release(true)` in code; idempotency stays ON"
            );
            return Ok(false);
        }
        tracing::warn!(
            source,
            "idem: DISABLED: every #[idempotent] body runs unprotected (counted as outcome `unprotected`); duplicates run again"
        );
        Ok(true)
    }
}

/// `IDEM_DISABLED`'s value: unset or empty is no opinion; anything but a yes or a no is an
/// error, so a typo does not silently leave idem on (or off).
fn parse_env(value: Option<&str>) -> Result<Option<bool>, Error> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(Some(true)),
        "false" | "0" | "no" | "off" => Ok(Some(false)),
        _ => Err(Error::Config(format!(
            "{ENV_VAR}={value:?}: expected `true` or `false` (also 1/0, yes/no, on/off)"
        ))),
    }
}

/// [`ENV_VAR`] as this process sees it; a value that is not UTF-8 is passed on as a
/// placeholder, so it is refused as not a yes or a no.
pub(crate) fn env_value() -> Option<String> {
    std::env::var_os(ENV_VAR).map(|v| v.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: Switch = Switch {
        disabled: false,
        allow_in_release: false,
    };
    const ON: Switch = Switch {
        disabled: true,
        allow_in_release: false,
    };

    #[test]
    fn the_variable_wins_over_the_setting_when_set() {
        assert_eq!(OFF.decide(None, false).ok(), Some(false));
        assert_eq!(ON.decide(None, false).ok(), Some(true));
        assert_eq!(OFF.decide(Some("true"), false).ok(), Some(true));
        assert_eq!(OFF.decide(Some(" YES "), false).ok(), Some(true));
        assert_eq!(ON.decide(Some("0"), false).ok(), Some(false));
        assert_eq!(
            ON.decide(Some(""), false).ok(),
            Some(true),
            "empty is unset"
        );
    }

    #[test]
    fn a_release_build_needs_the_code_to_allow_it() {
        assert_eq!(OFF.decide(Some("true"), true).ok(), Some(false));
        assert_eq!(ON.decide(None, true).ok(), Some(false));
        let allowed = Switch {
            allow_in_release: true,
            ..OFF
        };
        assert_eq!(allowed.decide(Some("true"), true).ok(), Some(true));
        assert_eq!(allowed.decide(None, true).ok(), Some(false));
    }

    #[test]
    fn a_typo_in_the_variable_does_not_stop_a_release_build_that_ignores_it() {
        assert_eq!(OFF.decide(Some("flase"), true).ok(), Some(false));
        let allowed = Switch {
            disabled: false,
            allow_in_release: true,
        };
        assert!(allowed.decide(Some("flase"), true).is_err());
    }

    #[test]
    fn a_value_that_is_no_yes_or_no_is_refused() {
        let msg = OFF.decide(Some("maybe"), false).unwrap_err().to_string();
        assert!(
            msg.contains("IDEM_DISABLED") && msg.contains("maybe"),
            "{msg}"
        );
    }
}
