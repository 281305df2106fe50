//! The agent's token: where a request presents it and how it is compared.

use axum::extract::Request;
use sha2::{Digest, Sha256};

/// The token a request presents, as Consul's agent reads it: the `X-Consul-Token` header,
/// then `Authorization: Bearer`, then `?token=`.
pub(crate) fn presented(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(value) = headers.get("x-consul-token") {
        return value.to_str().ok().map(str::to_string);
    }
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    let query = request.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// Compares in time independent of where the two differ: both sides are hashed first, so
/// neither their contents nor their lengths leak through timing.
pub(crate) fn equal(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn comparison() {
        assert!(super::equal("s3cret", "s3cret"));
        assert!(!super::equal("s3cret", "s3cres"));
        assert!(!super::equal("", "s3cret"));
        assert!(!super::equal("s3cret-longer", "s3cret"));
    }
}
