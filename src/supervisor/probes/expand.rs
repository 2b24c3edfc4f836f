//! `${NAME}` in probe strings, from the instance's environment. Pure.
//!
//! Rules: `${NAME}` is replaced by the variable's value (NAME: a letter or
//! `_`, then letters, digits, `_`); a name the environment lacks is an
//! error that names it. `$$` is one literal `$`. A `$` followed by
//! anything but `{` or `$` stays as it is, so a regex's `$` anchor needs no
//! escape. An unclosed `${` or a `${…}` that is not a name is an error.

/// `text` with every `${NAME}` replaced by `lookup(NAME)`; `escape`
/// rewrites each inserted value (a regex escapes it, so a value matches
/// literally).
pub fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
    escape: impl Fn(&str) -> String,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err(format!(
                    "{text:?} has an unclosed \"${{\": write ${{NAME}}, or $$ for a literal $"
                ));
            };
            let name = &tail[..end];
            if !is_name(name) {
                return Err(format!(
                    "{text:?}: \"${{{name}}}\" is not a variable name (letters, digits and _, not \
                     starting with a digit); write $$ for a literal $"
                ));
            }
            let Some(value) = lookup(name) else {
                return Err(format!(
                    "{text:?} names ${{{name}}}, which is not in the instance's environment: \
                     set it in env, or write $${{{name}}} for the literal text"
                ));
            };
            out.push_str(&escape(&value));
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8000".into()),
            "DROVER_INSTANCE" => Some("2".into()),
            "DOT" => Some("a.b".into()),
            _ => None,
        }
    }

    fn plain(text: &str) -> Result<String, String> {
        expand(text, env, str::to_string)
    }

    #[test]
    fn names_are_replaced_and_dollars_follow_the_rules() {
        assert_eq!(plain("http://127.0.0.1:${PORT}/h").unwrap(), "http://127.0.0.1:8000/h");
        assert_eq!(plain("w${DROVER_INSTANCE}${PORT}").unwrap(), "w28000");
        assert_eq!(plain("cost $$5 and $${PORT}").unwrap(), "cost $5 and ${PORT}");
        assert_eq!(plain("^ready$").unwrap(), "^ready$", "a lone $ stays");
        assert_eq!(plain("$PORT $").unwrap(), "$PORT $", "only braces expand");
        assert_eq!(plain("").unwrap(), "");
    }

    #[test]
    fn errors_name_the_variable_and_what_to_write() {
        let e = plain("http://h:${NOPE}/").unwrap_err();
        assert!(e.contains("${NOPE}") && e.contains("not in the instance's environment"), "{e}");
        let e = plain("x ${PORT").unwrap_err();
        assert!(e.contains("unclosed"), "{e}");
        let e = plain("${1X}").unwrap_err();
        assert!(e.contains("\"${1X}\" is not a variable name"), "{e}");
        assert!(plain("${}").is_err());
    }

    #[test]
    fn the_escape_applies_to_values_only() {
        let r = expand("^on ${DOT}$", env, regex::escape).unwrap();
        assert_eq!(r, r"^on a\.b$");
    }

    proptest! {
        /// Any input: no panic; text without `$` comes back unchanged.
        #[test]
        fn never_panics(s in ".{0,40}") {
            let r = plain(&s);
            if !s.contains('$') {
                prop_assert_eq!(r, Ok(s));
            }
        }
    }
}
