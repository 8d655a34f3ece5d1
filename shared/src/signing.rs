//! Webhook signatures, as the Standard Webhooks specification defines them
//! (<https://www.standardwebhooks.com/>): each delivery carries `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`, which is `v1,`
//! and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under the
//! subscription's secret. Receivers verify with any Standard Webhooks
//! library; the suite checks these signatures with the reference Python one.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// A secret that is not `whsec_` and base64.
#[derive(Debug, thiserror::Error)]
#[error("webhook secret is not 'whsec_' followed by base64")]
pub struct BadSecret;

/// The `webhook-signature` header for `body` sent as message `id` at
/// `timestamp` (Unix seconds), signed with `secret`.
///
/// # Errors
///
/// [`BadSecret`] when `secret` is not `whsec_` and base64.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadSecret> {
    let key = STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret))
        .map_err(|_| BadSecret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| BadSecret)?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference
    /// libraries (their test suites sign this payload with this secret).
    #[test]
    fn matches_the_specifications_example() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            signature.ok().as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn new_secrets_are_distinct_and_usable() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert!(sign(&a, "evt_1", 1, b"{}").is_ok());
        assert!(sign("whsec_not base64!", "evt_1", 1, b"{}").is_err());
    }
}
