//! uid — the DICOM UID as a validated value: what a peer-supplied Study, Series or SOP Instance UID must be
//! before anything (a file name, a directory, a store key) is derived from it.
//!
//! Owns: the UI value-representation check (PS3.5 §9.1, 6.2): 1 to 64 characters, only the digits `0`–`9` and
//! `.`, no empty component (so never `.`, `..`, a leading, trailing or doubled dot), and the [`Uid`] newtype
//! that can only hold such a value.
//! Hands on: [`Uid`] to `instance` (which refuses an instance carrying a malformed one) and to `datadir` (which
//! names files and directories after it).
//! Never: repairs a UID (trims, replaces characters, truncates): a malformed value is refused, with the reason.
//!
//! Not checked: leading zeros inside a component (`1.02.3`). The standard forbids them, but they are seen from
//! real scanners, they cannot steer a path, and refusing them would lose acknowledged-worthy data.

use std::fmt;

/// Longest UID the UI value representation allows.
pub const MAX_LEN: usize = 64;

/// Why a string is not a UID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// Zero characters.
    #[error("is empty")]
    Empty,
    /// More than [`MAX_LEN`] characters.
    #[error("is {0} characters long (at most 64)")]
    TooLong(usize),
    /// A character other than a digit or `.`.
    #[error("has the character {ch:?} at position {at} (only digits and dots are allowed)")]
    BadChar {
        /// The offending character.
        ch: char,
        /// Its character index.
        at: usize,
    },
    /// Two dots in a row, or a dot at the start or end (`.`, `..`, `1..2`, `.1`, `1.`).
    #[error("has an empty component (a leading, trailing or doubled dot)")]
    EmptyComponent,
}

/// A well-formed DICOM UID: digits and dots only, no empty component, at most 64 characters. Safe to use as a
/// file or directory name (it can never be `.`, `..`, contain `/`, or be empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(
    /// The validated value (no padding).
    String,
);

impl Uid {
    /// Validates `s` exactly as given (callers strip the UI padding — trailing NUL or space — first).
    pub fn parse(s: &str) -> Result<Uid, UidError> {
        check(s)?;
        Ok(Uid(s.to_string()))
    }

    /// The UID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The UI value-representation check of [`Uid::parse`], without allocating.
pub fn check(s: &str) -> Result<(), UidError> {
    if s.is_empty() {
        return Err(UidError::Empty);
    }
    let n = s.chars().count();
    if let Some((at, ch)) = s.chars().enumerate().find(|(_, c)| !(c.is_ascii_digit() || *c == '.')) {
        return Err(UidError::BadChar { ch, at });
    }
    if n > MAX_LEN {
        return Err(UidError::TooLong(n));
    }
    if s.split('.').any(str::is_empty) {
        return Err(UidError::EmptyComponent);
    }
    Ok(())
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Uid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Uid {
    type Err = UidError;
    fn from_str(s: &str) -> Result<Uid, UidError> {
        Uid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_uids_pass() {
        for ok in ["1", "0", "1.2.840.10008.5.1.4.1.1.2", "2.25.218337455914981707327163553066519470731", "1.02.3"] {
            assert_eq!(Uid::parse(ok).unwrap().as_str(), ok);
        }
        let max = format!("1.{}", "2".repeat(62));
        assert_eq!(max.len(), 64);
        assert!(Uid::parse(&max).is_ok());
    }

    #[test]
    fn malformed_uids_are_refused_with_the_reason() {
        assert_eq!(Uid::parse(""), Err(UidError::Empty));
        assert_eq!(Uid::parse("."), Err(UidError::EmptyComponent));
        assert_eq!(Uid::parse(".."), Err(UidError::EmptyComponent));
        assert_eq!(Uid::parse("1..2"), Err(UidError::EmptyComponent));
        assert_eq!(Uid::parse(".1.2"), Err(UidError::EmptyComponent));
        assert_eq!(Uid::parse("1.2."), Err(UidError::EmptyComponent));
        assert_eq!(Uid::parse("../x"), Err(UidError::BadChar { ch: '/', at: 2 }));
        assert_eq!(Uid::parse("a/b"), Err(UidError::BadChar { ch: 'a', at: 0 }));
        assert_eq!(Uid::parse("1.2.abc"), Err(UidError::BadChar { ch: 'a', at: 4 }));
        assert_eq!(Uid::parse("1.2 "), Err(UidError::BadChar { ch: ' ', at: 3 }));
        assert_eq!(Uid::parse("1.2\0"), Err(UidError::BadChar { ch: '\0', at: 3 }));
        assert_eq!(Uid::parse("１.2"), Err(UidError::BadChar { ch: '１', at: 0 }), "only ASCII digits");
        let long = format!("1.{}", "2".repeat(63));
        assert_eq!(Uid::parse(&long), Err(UidError::TooLong(65)));
        assert!(UidError::TooLong(65).to_string().contains("65 characters"));
    }
}
