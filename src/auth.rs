//! Authentication: HS256 JWTs for WebSocket clients and an API key for HTTP callers.
//!
//! Pure code over strings: the shard extracts the token or key from the request
//! and asks [`Auth`]; the clock comes in as an argument to
//! [`Auth::verify_token_at`]. Secrets and tokens never appear in `Debug`,
//! `Display` or error texts, so errors can go to the client and to logs as they are.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused. The `Display` texts are safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented where one is required; close with 1008 or answer 401.
    #[error("authentication required: no token given")]
    Missing,
    /// The token's `exp` has passed; the client should fetch a new token.
    #[error("token expired")]
    Expired,
    /// The token is malformed, not HS256, badly signed, not yet valid or lacks a
    /// usable `sub`; the text says which, without quoting the token.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, as a string (a numeric `sub` becomes its decimal text).
    pub user_id: String,
}

/// Checks HS256 signatures with one shared secret.
#[derive(Clone)]
struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    /// An empty secret would let anyone mint tokens; refuse every token instead.
    usable: bool,
}

/// The relay's credentials: an optional JWT secret and an optional API key.
#[derive(Clone)]
pub struct Auth {
    jwt: Option<JwtVerifier>,
    api_key: Option<String>,
}

/// Claims the relay reads. Time claims are typed numbers, so a string `exp` or
/// `nbf` fails to deserialize and the token is refused (jsonwebtoken 9 would
/// treat it as absent, CVE-2026-25537; we validate time ourselves).
#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    exp: Option<f64>,
    nbf: Option<f64>,
}

impl Auth {
    /// Auth with the given HS256 secret and API key; `None` turns that check off.
    ///
    /// An empty secret or key fails closed: every token, or every presented key,
    /// is refused. The config file rejects empty values before this point.
    pub fn new(jwt_secret: Option<&str>, api_key: Option<&str>) -> Auth {
        let jwt = jwt_secret.map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            // exp and nbf are checked in `verify_token_at` with zero leeway; the
            // crate's own checks would accept a malformed exp as absent.
            validation.required_spec_claims.clear();
            validation.validate_exp = false;
            validation.validate_nbf = false;
            validation.leeway = 0;
            // No audience is configured, so an `aud` claim carries no meaning here.
            validation.validate_aud = false;
            JwtVerifier {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation,
                usable: !secret.is_empty(),
            }
        });
        Auth {
            jwt,
            api_key: api_key.map(str::to_string),
        }
    }

    /// Auth that accepts everyone: no JWT secret, no API key.
    pub fn disabled() -> Auth {
        Auth::new(None, None)
    }

    /// True when a JWT secret is configured, so `/ws` and `/chat` need a token.
    pub fn jwt_enabled(&self) -> bool {
        self.jwt.is_some()
    }

    /// True when an API key is configured, so HTTP publish/register/presence need it.
    pub fn api_key_enabled(&self) -> bool {
        self.api_key.is_some()
    }

    /// Verifies an HS256 token (exp checked with zero leeway when present; `sub` required, string or number → user id string).
    pub fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_token_at(token, SystemTime::now())
    }

    /// [`Auth::verify_token`] at a given time: `exp` must be after `now` and `nbf`
    /// (when present) not after it (RFC 7519 sections 4.1.4 and 4.1.5, no leeway).
    pub fn verify_token_at(&self, token: &str, now: SystemTime) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let Some(jwt) = &self.jwt else {
            return Err(invalid("tokens are not accepted by this server"));
        };
        if !jwt.usable {
            return Err(invalid("token authentication is misconfigured"));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &jwt.key, &jwt.validation)
            .map_err(|e| jwt_error(e.kind()))?
            .claims;
        // Before the epoch counts as time zero; only a broken clock gets there.
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(exp) = claims.exp {
            if now_secs >= exp {
                return Err(AuthError::Expired);
            }
        }
        if let Some(nbf) = claims.nbf {
            if now_secs < nbf {
                return Err(invalid("token not valid yet (nbf)"));
            }
        }
        let user_id = match claims.sub {
            None | Some(serde_json::Value::Null) => return Err(invalid("missing sub claim")),
            Some(serde_json::Value::String(s)) if s.is_empty() => {
                return Err(invalid("empty sub claim"))
            }
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => return Err(invalid("sub claim must be a string or an integer")),
        };
        Ok(Identity { user_id })
    }

    /// True if API-key auth is off, or `presented` equals the key (constant-time compare).
    pub fn api_key_ok(&self, presented: Option<&str>) -> bool {
        match (&self.api_key, presented) {
            (None, _) => true,
            (Some(key), _) if key.is_empty() => false,
            (Some(key), Some(presented)) => constant_time_eq(key.as_bytes(), presented.as_bytes()),
            (Some(_), None) => false,
        }
    }
}

/// Never prints the secret or the key, only whether each is set.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { "<redacted>" } else { "<none>" };
        f.debug_struct("Auth")
            .field("jwt_secret", &redacted(self.jwt.is_some()))
            .field("api_key", &redacted(self.api_key.is_some()))
            .finish()
    }
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_string())
}

/// Maps the crate's error to a fixed text: its own messages can quote claim
/// values (serde errors), which are parts of the token.
fn jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => AuthError::Expired,
        K::InvalidSignature => invalid("bad signature"),
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            invalid("only HS256 tokens are accepted")
        }
        K::ImmatureSignature => invalid("token not valid yet (nbf)"),
        K::Json(_) => invalid("malformed claims"),
        K::Base64(_) | K::Utf8(_) | K::InvalidToken => invalid("malformed token"),
        _ => invalid("token refused"),
    }
}

/// Compares without an early exit, so timing reveals at most the key's length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimizer from turning the fold back into a short-circuit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "test-secret-0123456789abcdef";

    fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Auth {
        Auth::new(Some(SECRET), None)
    }

    /// `{"alg":"none","typ":"JWT"}`, base64url.
    const HEADER_NONE: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    /// `{"alg":"RS256","typ":"JWT"}`, base64url.
    const HEADER_RS256: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9";

    /// Swaps the header of a valid HS256 token, keeping its payload and signature.
    fn with_header(token: &str, header: &str, keep_signature: bool) -> String {
        let mut parts = token.split('.');
        let (_, payload, sig) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let sig = if keep_signature { sig } else { "" };
        format!("{header}.{payload}.{sig}")
    }

    #[test]
    fn a_token_signed_with_the_secret_is_accepted() {
        let token = sign(json!({"sub": "alice", "exp": now_secs() + 60}), SECRET);
        let id = auth().verify_token(&token).unwrap();
        assert_eq!(id.user_id, "alice");
    }

    #[test]
    fn a_token_without_exp_is_accepted() {
        let token = sign(json!({"sub": "alice"}), SECRET);
        assert_eq!(auth().verify_token(&token).unwrap().user_id, "alice");
    }

    #[test]
    fn a_numeric_sub_becomes_its_decimal_string() {
        let token = sign(json!({"sub": 42}), SECRET);
        assert_eq!(auth().verify_token(&token).unwrap().user_id, "42");
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let token = sign(json!({"sub": "alice"}), "another-secret");
        assert_eq!(
            auth().verify_token(&token),
            Err(AuthError::Invalid("bad signature".into()))
        );
    }

    #[test]
    fn an_expired_token_is_refused_with_zero_leeway() {
        let exp = 1_700_000_000u64;
        let token = sign(json!({"sub": "alice", "exp": exp}), SECRET);
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        assert!(auth().verify_token_at(&token, at(exp - 1)).is_ok());
        assert_eq!(
            auth().verify_token_at(&token, at(exp)),
            Err(AuthError::Expired)
        );
        let past = sign(json!({"sub": "alice", "exp": now_secs() - 1}), SECRET);
        assert_eq!(auth().verify_token(&past), Err(AuthError::Expired));
    }

    #[test]
    fn a_string_exp_or_nbf_is_refused_not_ignored() {
        let token = sign(json!({"sub": "alice", "exp": "never"}), SECRET);
        assert!(matches!(
            auth().verify_token(&token),
            Err(AuthError::Invalid(_))
        ));
        let token = sign(json!({"sub": "alice", "nbf": "99999999999"}), SECRET);
        assert!(matches!(
            auth().verify_token(&token),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_future_nbf_is_refused() {
        let token = sign(json!({"sub": "alice", "nbf": now_secs() + 3600}), SECRET);
        assert_eq!(
            auth().verify_token(&token),
            Err(AuthError::Invalid("token not valid yet (nbf)".into()))
        );
    }

    #[test]
    fn a_missing_or_unusable_sub_is_refused() {
        for claims in [
            json!({"exp": now_secs() + 60}),
            json!({"sub": null}),
            json!({"sub": ""}),
            json!({"sub": 4.5}),
            json!({"sub": ["a"]}),
        ] {
            let token = sign(claims.clone(), SECRET);
            assert!(
                matches!(auth().verify_token(&token), Err(AuthError::Invalid(_))),
                "{claims}"
            );
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let hs = sign(json!({"sub": "alice"}), SECRET);
        for keep_signature in [false, true] {
            let token = with_header(&hs, HEADER_NONE, keep_signature);
            assert!(matches!(
                auth().verify_token(&token),
                Err(AuthError::Invalid(_))
            ));
        }
    }

    #[test]
    fn other_algorithms_are_refused_even_when_signed_with_the_secret() {
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let token = encode(
                &Header::new(alg),
                &json!({"sub": "alice"}),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap();
            assert_eq!(
                auth().verify_token(&token),
                Err(AuthError::Invalid("only HS256 tokens are accepted".into()))
            );
        }
        // An RS256 header over an HMAC signature: the classic key-confusion attempt.
        let hs = sign(json!({"sub": "alice"}), SECRET);
        let token = with_header(&hs, HEADER_RS256, true);
        assert_eq!(
            auth().verify_token(&token),
            Err(AuthError::Invalid("only HS256 tokens are accepted".into()))
        );
    }

    #[test]
    fn garbage_and_empty_tokens_are_refused() {
        assert_eq!(auth().verify_token(""), Err(AuthError::Missing));
        assert_eq!(auth().verify_token("  "), Err(AuthError::Missing));
        for junk in ["abc", "a.b.c", "....", "eyJ.eyJ.sig"] {
            assert!(
                matches!(auth().verify_token(junk), Err(AuthError::Invalid(_))),
                "{junk}"
            );
        }
    }

    #[test]
    fn without_a_secret_or_with_an_empty_one_no_token_is_accepted() {
        let token = sign(json!({"sub": "alice"}), SECRET);
        let off = Auth::disabled();
        assert!(!off.jwt_enabled());
        assert!(off.verify_token(&token).is_err());
        let empty = Auth::new(Some(""), None);
        assert!(empty.jwt_enabled());
        assert!(empty.verify_token(&sign(json!({"sub": "a"}), "")).is_err());
    }

    #[test]
    fn error_texts_never_quote_the_token() {
        let token = sign(json!({"sub": "alice", "exp": "sekrit-value"}), SECRET);
        let text = auth().verify_token(&token).unwrap_err().to_string();
        assert!(!text.contains("sekrit") && !text.contains(&token), "{text}");
    }

    #[test]
    fn api_key_is_compared_exactly() {
        assert!(Auth::disabled().api_key_ok(None));
        assert!(Auth::disabled().api_key_ok(Some("anything")));
        let a = Auth::new(None, Some("k3y"));
        assert!(a.api_key_enabled());
        assert!(a.api_key_ok(Some("k3y")));
        assert!(!a.api_key_ok(Some("k3Y")));
        assert!(!a.api_key_ok(Some("k3y ")));
        assert!(!a.api_key_ok(Some("")));
        assert!(!a.api_key_ok(None));
        let empty = Auth::new(None, Some(""));
        assert!(!empty.api_key_ok(Some("")));
    }

    #[test]
    fn debug_redacts_secrets() {
        let text = format!("{:?}", Auth::new(Some(SECRET), Some("k3y-value")));
        assert!(
            !text.contains(SECRET) && !text.contains("k3y-value"),
            "{text}"
        );
        assert!(text.contains("<redacted>"), "{text}");
    }
}
