//! Bootstrap tokens: a short-lived, CA-signed statement "the bearer may get
//! its first SVID for identity X until time T". Verified statelessly with the
//! CA's token key (HMAC-SHA256), so any CA replica sharing the directory can
//! check them without a database.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

const PREFIX: &str = "bwt1";
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature is invalid (forged, or minted by another CA)")]
    BadSignature,
    #[error("token expired at {0} (Unix seconds)")]
    Expired(i64),
    #[error("token is not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
    #[error("token names an invalid identity: {0}")]
    Identity(String),
    #[error("token is valid for {0}s; at most {MAX_TOKEN_TTL_SECS}s are accepted")]
    TooLong(i64),
}

/// Longest lifetime of a bootstrap token: it is a bearer credential that
/// can be presented again until it expires, so it is kept short.
pub const MAX_TOKEN_TTL_SECS: i64 = 24 * 3600;

/// What a valid token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// The SPIFFE ID the bearer may claim.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Random token id, for the issuance record.
    pub jti: String,
}

impl TokenClaims {
    pub fn identity(&self) -> Result<SpiffeId, TokenError> {
        self.sub
            .parse()
            .map_err(|e: crate::identity::IdentityError| TokenError::Identity(e.to_string()))
    }
}

/// The secret that signs and verifies tokens.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn from_bytes(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Mints a token for `identity`, valid from `now` for `ttl_secs`.
    pub fn mint(&self, identity: &SpiffeId, now: i64, ttl_secs: i64) -> String {
        let jti: [u8; 12] = crate::random_bytes();
        let claims = TokenClaims {
            sub: identity.to_string(),
            iat: now,
            exp: now + ttl_secs,
            jti: hex(&jti),
        };
        let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{payload}");
        let tag = hmac::sign(&self.0, signed.as_bytes());
        format!("{signed}.{}", B64.encode(tag.as_ref()))
    }

    /// Verifies signature and validity window (with `skew_secs` tolerance).
    pub fn verify(&self, token: &str, now: i64, skew_secs: i64) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 4096 bytes"));
        }
        let token = token.trim();
        let (signed, tag) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("expected bwt1.<claims>.<signature>"))?;
        let (prefix, payload) = signed
            .split_once('.')
            .ok_or(TokenError::Malformed("expected bwt1.<claims>.<signature>"))?;
        if prefix != PREFIX {
            return Err(TokenError::Malformed("unknown token version"));
        }
        let tag = B64
            .decode(tag)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        // Constant-time comparison inside aws-lc.
        hmac::verify(&self.0, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let raw = B64
            .decode(payload)
            .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let claims: TokenClaims = serde_json::from_slice(&raw)
            .map_err(|_| TokenError::Malformed("claims are not JSON"))?;
        let lifetime = claims.exp.saturating_sub(claims.iat);
        if !(0..=MAX_TOKEN_TTL_SECS).contains(&lifetime) {
            return Err(TokenError::TooLong(lifetime));
        }
        if now > claims.exp.saturating_add(skew_secs) {
            return Err(TokenError::Expired(claims.exp));
        }
        if now.saturating_add(skew_secs) < claims.iat {
            return Err(TokenError::NotYetValid(claims.iat));
        }
        claims.identity()?;
        Ok(claims)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
    }

    #[test]
    fn minted_token_verifies_and_carries_identity() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&id(), 1000, 60);
        let claims = key.verify(&t, 1010, 0).unwrap();
        assert_eq!(claims.identity().unwrap(), id());
        assert_eq!(claims.exp, 1060);
    }

    #[test]
    fn token_from_other_key_is_refused_as_forged() {
        let t = TokenKey::from_bytes(b"other").mint(&id(), 1000, 60);
        assert_eq!(
            TokenKey::from_bytes(b"k1").verify(&t, 1000, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn edited_claims_are_refused() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&id(), 1000, 60);
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims = B64.encode(
            br#"{"sub":"spiffe://cluster.local/ns/kube-system/sa/admin","iat":1000,"exp":99999,"jti":"x"}"#,
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(key.verify(&forged, 1000, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn tokens_valid_longer_than_a_day_are_refused() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&id(), 1000, MAX_TOKEN_TTL_SECS);
        assert!(key.verify(&t, 1000, 0).is_ok());
        let t = key.mint(&id(), 1000, MAX_TOKEN_TTL_SECS + 1);
        assert_eq!(
            key.verify(&t, 1000, 0),
            Err(TokenError::TooLong(MAX_TOKEN_TTL_SECS + 1))
        );
        // An expiry before the issue time is no lifetime at all.
        let t = key.mint(&id(), 1000, -1);
        assert_eq!(key.verify(&t, 999, 0), Err(TokenError::TooLong(-1)));
    }

    #[test]
    fn expired_and_malformed_tokens_are_refused() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&id(), 1000, 60);
        assert_eq!(key.verify(&t, 1061, 0), Err(TokenError::Expired(1060)));
        assert!(matches!(
            key.verify("garbage", 0, 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            key.verify("bwt1.a.b", 0, 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            key.verify(&"x".repeat(5000), 0, 0),
            Err(TokenError::Malformed(_))
        ));
    }
}
