//! Blob keys: validated, path-safe names of artifacts, and their content-addressed form.
//!
//! Key rules (the same for every backend, so a key valid on local disk is valid on S3):
//! - 1 to 1024 ASCII characters from `A-Z a-z 0-9 - _ . /`;
//! - `/`-separated segments, none empty: no leading or trailing `/`, no `//`;
//! - no segment starts with `.`: this rules out `.` and `..` and reserves dot-names for the stores'
//!   own temporary files.
//!
//! Content-addressed keys look like `sha256/ab/ab12…(64 hex).png`: the SHA-256 of the bytes in lowercase
//! hex, fanned out by its first two hex digits so no directory holds millions of files, and the
//! content kind as extension (`png`, `safetensors`, …; none when the kind is empty). The namespace
//! (an S3 prefix, or the root directory of a local store) is the store's, not the key's: the same key
//! names the same artifact in every store.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{BlobError, Result};

const MAX_KEY_LENGTH: usize = 1024;
const MAX_KIND_LENGTH: usize = 16;
/// The first segment of every content-addressed key.
pub const CONTENT_ADDRESS_PREFIX: &str = "sha256/";

/// The validated name of a blob, e.g. `sha256/ab/ab12….png` or `jobs/42/frames/0007.png`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobKey(String);

impl BlobKey {
    /// Validates `key` against the key rules of this module.
    pub fn new(key: impl Into<String>) -> Result<BlobKey> {
        let key = key.into();
        match key_rule_broken(&key, false) {
            Some(reason) => Err(invalid_key(&key, reason)),
            None => Ok(BlobKey(key)),
        }
    }

    /// The content address of `bytes`: `sha256/<aa>/<64 hex>.<kind>`, or without extension when
    /// `kind` is empty. `kind` must be 1 to 16 lowercase ASCII letters or digits.
    pub fn for_content(kind: &str, bytes: &[u8]) -> Result<BlobKey> {
        let kind_is_valid = kind.len() <= MAX_KIND_LENGTH
            && kind
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
        if !kind_is_valid {
            return Err(invalid_key(
                kind,
                "content kind must be at most 16 lowercase ascii letters or digits",
            ));
        }
        let digest = hex::encode(Sha256::digest(bytes));
        let extension = if kind.is_empty() {
            String::new()
        } else {
            format!(".{kind}")
        };
        Ok(BlobKey(format!(
            "{CONTENT_ADDRESS_PREFIX}{}/{digest}{extension}",
            &digest[..2]
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex SHA-256 this key claims for its content, when it is a content-addressed key.
    pub fn content_sha256(&self) -> Option<&str> {
        let rest = self.0.strip_prefix(CONTENT_ADDRESS_PREFIX)?;
        let (fan_out, file_name) = rest.split_once('/')?;
        let digest = file_name.split('.').next()?;
        let is_digest = digest.len() == 64
            && digest
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
        (is_digest && digest.starts_with(fan_out) && fan_out.len() == 2).then_some(digest)
    }
}

/// Checks a list prefix: the key rules, except that it may be empty and may end with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    match key_rule_broken(prefix, true) {
        Some(reason) => Err(invalid_key(prefix, reason)),
        None => Ok(()),
    }
}

fn invalid_key(key: &str, reason: &str) -> BlobError {
    BlobError::InvalidKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The first key rule `key` breaks, if any. A prefix may be empty and end with `/`, and its last
/// segment may be partial (`jobs/4` matches `jobs/42/…`).
fn key_rule_broken(key: &str, is_prefix: bool) -> Option<&'static str> {
    if key.is_empty() && !is_prefix {
        return Some("key is empty");
    }
    if key.len() > MAX_KEY_LENGTH {
        return Some("key is longer than 1024 bytes");
    }
    let is_allowed =
        |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/');
    if !key.bytes().all(is_allowed) {
        return Some("only ascii letters, digits and - _ . / are allowed");
    }
    if key.starts_with('/') {
        return Some("key must not start with /");
    }
    let key_without_trailing_slash = match key.strip_suffix('/') {
        Some(rest) if is_prefix => rest,
        Some(_) => return Some("key must not end with /"),
        None => key,
    };
    if key_without_trailing_slash.is_empty() {
        return None;
    }
    for segment in key_without_trailing_slash.split('/') {
        if segment.is_empty() {
            return Some("key must not contain empty segments (//)");
        }
        if segment.starts_with('.') {
            return Some("no segment may start with . (this rules out . and ..)");
        }
    }
    None
}

impl fmt::Display for BlobKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "BlobKey({:?})", self.0)
    }
}

impl AsRef<str> for BlobKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for BlobKey {
    type Err = BlobError;
    fn from_str(key: &str) -> Result<BlobKey> {
        BlobKey::new(key)
    }
}

impl TryFrom<String> for BlobKey {
    type Error = BlobError;
    fn try_from(key: String) -> Result<BlobKey> {
        BlobKey::new(key)
    }
}

impl From<BlobKey> for String {
    fn from(key: BlobKey) -> String {
        key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_path_safe_keys() {
        for key in [
            "a",
            "jobs/42/frames/0007.png",
            "sha256/ab/ab.png",
            "A-b_c.d/e",
            "x/y.tar.gz",
        ] {
            assert_eq!(BlobKey::new(key).unwrap().as_str(), key);
        }
    }

    #[test]
    fn rejects_unsafe_keys_naming_them() {
        let cases = [
            ("", "empty"),
            ("/etc/passwd", "start with /"),
            ("a/../b", "segment"),
            ("..", "segment"),
            ("a/./b", "segment"),
            ("a/.hidden", "segment"),
            ("a//b", "empty segments"),
            ("a/", "end with /"),
            ("a b", "ascii"),
            ("a\\b", "ascii"),
            ("é", "ascii"),
            ("a?b", "ascii"),
        ];
        for (key, reason_part) in cases {
            let error = BlobKey::new(key).unwrap_err();
            let BlobError::InvalidKey { key: named, reason } = &error else {
                panic!("{key:?}: expected InvalidKey, got {error:?}");
            };
            assert_eq!(named, key);
            assert!(reason.contains(reason_part), "{key:?}: reason {reason:?}");
            assert!(error.to_string().contains(&format!("{key:?}")), "{error}");
        }
        assert!(BlobKey::new("a".repeat(1025)).is_err());
    }

    #[test]
    fn content_address_is_sha256_fanned_out_with_extension() {
        // sha256("abc"), a published test vector.
        let digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let key = BlobKey::for_content("png", b"abc").unwrap();
        assert_eq!(key.as_str(), format!("sha256/ba/{digest}.png"));
        assert_eq!(key.content_sha256(), Some(digest));
        let bare = BlobKey::for_content("", b"abc").unwrap();
        assert_eq!(bare.as_str(), format!("sha256/ba/{digest}"));
        assert_eq!(bare.content_sha256(), Some(digest));
        assert_eq!(BlobKey::new("jobs/1.png").unwrap().content_sha256(), None);
        for kind in ["PNG", "p.ng", "../x", "a/b", "abcdefghijklmnopq"] {
            assert!(BlobKey::for_content(kind, b"abc").is_err(), "{kind}");
        }
    }

    #[test]
    fn prefixes_may_be_empty_partial_or_end_with_slash() {
        for prefix in ["", "sha256/", "jobs/4", "jobs/42/frames/"] {
            validate_prefix(prefix).unwrap();
        }
        for prefix in ["/", "/jobs", "a/../", "a//", ".."] {
            assert!(validate_prefix(prefix).is_err(), "{prefix}");
        }
    }

    #[test]
    fn serde_validates() {
        let key: BlobKey = serde_json::from_str("\"a/b.png\"").unwrap();
        assert_eq!(key.as_str(), "a/b.png");
        assert!(serde_json::from_str::<BlobKey>("\"../b\"").is_err());
    }
}
