//! JWT verification (HS256 with a shared secret, or RS256/ES256 with a public key from a PEM
//! file, the algorithm chosen by the key) and minting for `tidings token`.
//!
//! Only the configured algorithm is accepted: `alg: none` and algorithm confusion (an RSA
//! public key presented as an HS256 secret) fail verification like any other bad token.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// The `tidings` claim: what the bearer may do.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Grants {
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub tidings: Grants,
}

/// A token failed verification; deliberately says no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidToken;

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    pub algorithm: Algorithm,
}

impl JwtVerifier {
    pub fn hs256(secret: &str) -> Self {
        Self::new(
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
    }

    /// RS256 for an RSA key, ES256 for an EC (P-256) key.
    pub fn from_public_key_file(path: &Path) -> Result<Self, ConfigError> {
        let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        if String::from_utf8_lossy(&pem).contains("PRIVATE KEY") {
            return Err(ConfigError::Invalid(format!(
                "auth.jwt_public_key_file = {}: this is a private key; give the server only the public key",
                path.display()
            )));
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Self::new(key, Algorithm::ES256));
        }
        Err(ConfigError::Invalid(format!(
            "auth.jwt_public_key_file = {}: not an RSA or EC (P-256) public key in PEM form",
            path.display()
        )))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // `exp` is checked when present; a deployment that wants it mandatory can say so by
        // minting only expiring tokens. Audience and issuer are not part of the contract.
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        Self {
            key,
            validation,
            algorithm,
        }
    }

    /// The claims of a valid token. Every defect is the same `InvalidToken`: callers answer
    /// one 401 for all of them, so nobody learns which check failed.
    pub fn verify(&self, token: &str) -> Result<Claims, InvalidToken> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| InvalidToken)
    }
}

/// Signs claims with an HS256 secret (what `tidings token` does with `auth.jwt_secret`).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Signs claims with an RSA or EC private key in PEM form (RS256 / ES256).
pub fn mint_with_private_key(pem: &[u8], claims: &Claims) -> Result<String, String> {
    if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
        return jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key)
            .map_err(|e| e.to_string());
    }
    if let Ok(key) = EncodingKey::from_ec_pem(pem) {
        return jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key)
            .map_err(|e| e.to_string());
    }
    if let Some(pkcs8) = sec1_p256_to_pkcs8(pem) {
        return jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            claims,
            &EncodingKey::from_ec_der(&pkcs8),
        )
        .map_err(|e| format!("the EC PRIVATE KEY is not a usable P-256 key: {e}"));
    }
    Err("not an RSA or EC (P-256) private key in PEM form (PKCS#8 `BEGIN PRIVATE KEY`, SEC1 `BEGIN EC PRIVATE KEY` or PKCS#1 `BEGIN RSA PRIVATE KEY`)".into())
}

/// `openssl ecparam -genkey` writes SEC1 (`BEGIN EC PRIVATE KEY`, often after an
/// `EC PARAMETERS` block), which jsonwebtoken does not read; it takes PKCS#8. A SEC1 key is
/// PKCS#8's inner octet string, so wrapping it in the P-256 `PrivateKeyInfo` header is the
/// whole conversion. `None` when there is no such block; another curve fails at signing.
fn sec1_p256_to_pkcs8(pem: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN EC PRIVATE KEY-----";
    const END: &str = "-----END EC PRIVATE KEY-----";
    // version 0, AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const HEADER: [u8; 24] = [
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let text = std::str::from_utf8(pem).ok()?;
    let body = text.split_once(BEGIN)?.1.split_once(END)?.0;
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let sec1 = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let mut octets = vec![0x04];
    der_length(&mut octets, sec1.len())?;
    octets.extend_from_slice(&sec1);
    let mut out = vec![0x30];
    der_length(&mut out, HEADER.len() + octets.len())?;
    out.extend_from_slice(&HEADER);
    out.extend_from_slice(&octets);
    Some(out)
}

/// A DER length (short form, or long form up to two bytes: keys are far smaller).
fn der_length(out: &mut Vec<u8>, len: usize) -> Option<()> {
    match len {
        0..=0x7f => out.push(u8::try_from(len).ok()?),
        0x80..=0xff => out.extend_from_slice(&[0x81, u8::try_from(len).ok()?]),
        _ => {
            let len = u16::try_from(len).ok()?;
            out.push(0x82);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        tidings_core::broker::memory::now_millis() / 1000
    }

    fn claims(exp: Option<u64>, nbf: Option<u64>) -> Claims {
        Claims {
            sub: Some("alice".into()),
            exp,
            nbf,
            iat: None,
            tidings: Grants {
                subscribe: vec!["chat:*".into()],
                publish: vec![],
            },
        }
    }

    #[test]
    fn a_minted_token_verifies_with_its_secret_only() {
        let token = mint_hs256("s3cret", &claims(Some(now() + 60), None)).unwrap();
        let c = JwtVerifier::hs256("s3cret").verify(&token).unwrap();
        assert_eq!(c.sub.as_deref(), Some("alice"));
        assert_eq!(c.tidings.subscribe, vec!["chat:*".to_string()]);
        assert!(JwtVerifier::hs256("other").verify(&token).is_err());
    }

    #[test]
    fn expired_and_not_yet_valid_tokens_are_refused() {
        let v = JwtVerifier::hs256("k");
        let expired = mint_hs256("k", &claims(Some(now() - 60), None)).unwrap();
        assert!(v.verify(&expired).is_err());
        let early = mint_hs256("k", &claims(None, Some(now() + 60))).unwrap();
        assert!(v.verify(&early).is_err());
        let fine = mint_hs256("k", &claims(None, None)).unwrap();
        assert!(v.verify(&fine).is_ok());
    }

    /// Runs `openssl` (scripts/test.sh installs it) and returns its stdout.
    fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl is installed (scripts/test.sh)");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?} failed");
        out.stdout
    }

    #[test]
    fn a_sec1_ec_key_as_openssl_ecparam_writes_it_mints_tokens_its_public_key_verifies() {
        // With and without the EC PARAMETERS block that `ecparam -genkey` puts first.
        for args in [
            &["ecparam", "-name", "prime256v1", "-genkey"][..],
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"][..],
        ] {
            let private = openssl(args, b"");
            assert!(String::from_utf8_lossy(&private).contains("BEGIN EC PRIVATE KEY"));
            let public = openssl(&["ec", "-pubout"], &private);
            let dir = std::env::temp_dir().join(format!("tidings-sec1-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let public_file = dir.join("public.pem");
            std::fs::write(&public_file, public).unwrap();
            let token = mint_with_private_key(&private, &claims(Some(now() + 60), None)).unwrap();
            let verifier = JwtVerifier::from_public_key_file(&public_file).unwrap();
            assert_eq!(verifier.algorithm, Algorithm::ES256);
            assert_eq!(
                verifier.verify(&token).unwrap().sub.as_deref(),
                Some("alice")
            );
        }
        let p384 = openssl(&["ecparam", "-name", "secp384r1", "-genkey", "-noout"], b"");
        assert!(mint_with_private_key(&p384, &claims(None, None)).is_err());
        assert!(
            mint_with_private_key(
                b"-----BEGIN EC PRIVATE KEY-----\n!!\n-----END EC PRIVATE KEY-----\n",
                &claims(None, None)
            )
            .is_err()
        );
    }

    #[test]
    fn alg_none_and_garbage_are_refused() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(br#"{"sub":"mallory","tidings":{"subscribe":["*"]}}"#);
        let v = JwtVerifier::hs256("k");
        assert!(v.verify(&format!("{header}.{body}.")).is_err());
        assert!(v.verify("not.a.token").is_err());
        assert!(v.verify("").is_err());
    }
}
