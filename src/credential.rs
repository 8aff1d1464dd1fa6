//! Bearer tokens, for every listener others may reach (the HTTP API, the log server): reading a
//! token file, checking a request's `Authorization` header in constant time, and the rule that
//! only loopback listeners may go without one. A token is never echoed, logged or counted.

use std::net::SocketAddr;

use axum::http::{HeaderMap, header};

use crate::source::postgres::config::Secret;

/// Reads a token file: its content without surrounding whitespace, at least 16 bytes.
pub fn read_token(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{} must hold one token of at least 16 characters without spaces",
            path.display()
        ));
    }
    Ok(Secret::new(token))
}

/// Why a request's credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not the one configured.
    Wrong,
}

/// Checks `Authorization: Bearer <token>` against `token`, in time that depends only on the
/// lengths.
pub fn check_bearer(headers: &HeaderMap, token: &Secret) -> Result<(), Refused> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Err(Refused::Missing),
        Some(p) if same_secret(p.trim().as_bytes(), token.expose().as_bytes()) => Ok(()),
        Some(_) => Err(Refused::Wrong),
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The problem with a listener on `listen` without a credential, if any: only loopback may go
/// without one. `what` names the listener and `setting` the section that gives it a token.
pub fn needs_credential(listen: SocketAddr, token: Option<&Secret>, what: &str, setting: &str) -> Option<String> {
    (!listen.ip().is_loopback() && token.is_none()).then(|| {
        format!(
            "{listen} is not a loopback address: a {what} others can reach needs a credential; set {setting} \
             (its clients then send Authorization: Bearer <token>), or listen on 127.0.0.1"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_matches_only_itself() {
        let token = Secret::new("0123456789abcdef");
        let mut h = HeaderMap::new();
        assert_eq!(check_bearer(&h, &token), Err(Refused::Missing));
        h.insert(header::AUTHORIZATION, "Bearer 0123456789abcdeX".parse().unwrap());
        assert_eq!(check_bearer(&h, &token), Err(Refused::Wrong));
        h.insert(header::AUTHORIZATION, "Bearer 0123456789abcdef".parse().unwrap());
        assert_eq!(check_bearer(&h, &token), Ok(()));
        h.insert(header::AUTHORIZATION, "Basic 0123456789abcdef".parse().unwrap());
        assert_eq!(check_bearer(&h, &token), Err(Refused::Missing));
    }
}
