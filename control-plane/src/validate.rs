//! What every configuration source (flags, the TOML file, API JSON, gRPC) shares when a
//! value is refused: [`Invalid`], whose text names the field, and the helper for tables
//! that cannot deny unknown fields themselves.

use std::collections::BTreeMap;

/// A value that cannot be used. The text names where it is (`groups.web.port`,
/// `notifiers.ops.email.to[0]`) and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A table that flattens another type (a delivery policy) cannot also deny unknown
/// fields (serde does not support both); it collects them instead, and this names the
/// first.
pub fn unknown_fields<V>(unknown: &BTreeMap<String, V>, table: &str) -> Result<(), Invalid> {
    match unknown.keys().next() {
        Some(key) => Err(Invalid(format!("{table}: unknown field `{key}`"))),
        None => Ok(()),
    }
}
