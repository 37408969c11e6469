//! Client authentication: configured secrets, and the server side of SCRAM-SHA-256, md5 and
//! cleartext password checks.
//!
//! Pure and synchronous: the login code owns the socket and feeds message bodies in, so the part
//! that parses untrusted bytes can be tested exhaustively. Every parser answers bad input with an
//! [`AuthError`], never a panic.
//!
//! SASLprep: PostgreSQL normalises passwords with SASLprep (RFC 4013) before deriving SCRAM keys,
//! and so do libpq and tokio-postgres. SASLprep is the identity on ASCII, and we carry no Unicode
//! normalisation tables, so our own key derivation ([`ScramVerifier::from_password`]) is exact for
//! ASCII passwords only; the paths that matter for non-ASCII passwords
//! ([`Secret::scram_verifier`], [`verify_plain`]) borrow postgres-protocol's SASLprep instead.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// Iteration count PostgreSQL uses for new verifiers (its `scram_iterations` default).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length PostgreSQL uses for new verifiers.
pub const DEFAULT_SALT_LEN: usize = 16;
/// Verifiers claiming more iterations are rejected: a typo'd count would make every login burn CPU.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// postgres-protocol's client refuses server-first messages above this count.
const CLIENT_LIB_MAX_ITERATIONS: u32 = 100_000;
/// Same as PostgreSQL (SCRAM_RAW_NONCE_LEN), giving a 24-character base64 server nonce.
const SERVER_NONCE_LEN: usize = 18;
const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// Why an authentication step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A configured `SCRAM-SHA-256$…` verifier that cannot be used.
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    BadVerifier(&'static str),
    /// A configured md5 secret that is not `md5` + 32 lowercase hex digits.
    #[error("malformed md5 secret: expected \"md5\" followed by 32 lowercase hex digits")]
    BadMd5Secret,
    /// A SASL message from the client that does not follow RFC 5802.
    #[error("malformed SCRAM message: {0}")]
    BadMessage(&'static str),
    /// The client selected SCRAM-SHA-256-PLUS (`p=` gs2 flag), which we never advertise.
    #[error("the client requires SCRAM channel binding, but it is not supported")]
    ChannelBindingUnsupported,
    /// A SCRAM message arrived when the exchange was not expecting it.
    #[error("unexpected SCRAM message: {0}")]
    OutOfOrder(&'static str),
    /// The password, or the proof of knowing it, is wrong.
    #[error("password authentication failed")]
    PasswordMismatch,
    /// A SCRAM verifier holds neither the password nor its md5 hash, so md5 challenges can't be checked.
    #[error("md5 authentication needs a plaintext or md5 secret, but this user has a SCRAM-SHA-256 verifier")]
    Md5NeedsPlainOrMd5Secret,
}

/// A user's secret as configured.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A plaintext password.
    Plain(String),
    /// PostgreSQL's stored form `SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    Scram {
        /// PBKDF2 iteration count.
        iterations: u32,
        /// PBKDF2 salt.
        salt: Vec<u8>,
        /// H(HMAC(SaltedPassword, "Client Key")).
        stored_key: [u8; 32],
        /// HMAC(SaltedPassword, "Server Key").
        server_key: [u8; 32],
    },
    /// PostgreSQL's md5 form `md5` + hex(md5(password || username)).
    Md5(String),
}

// Secrets end up inside config structs that get logged; never print them.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Scram { iterations, .. } => {
                write!(f, "Secret::Scram {{ iterations: {iterations}, .. }}")
            }
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
        }
    }
}

impl Secret {
    /// Reads a configured password: a SCRAM verifier, an md5 hash (`md5` + 32 lowercase hex), or else plaintext.
    pub fn parse(s: &str) -> Result<Secret, AuthError> {
        if s.starts_with(SCRAM_PREFIX) {
            // PostgreSQL would take a malformed verifier as a plaintext password; a typo in a
            // pasted verifier should be reported instead of silently becoming the password.
            return ScramVerifier::parse(s).map(Secret::from);
        }
        if is_md5_secret(s) {
            return Ok(Secret::Md5(s.to_owned()));
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    /// The SCRAM verifier to check logins against (freshly salted for plaintext: cache it); None for md5.
    pub fn scram_verifier(&self) -> Option<ScramVerifier> {
        match self {
            // PostgreSQL cannot store an empty password at all; don't let one log in here either.
            Secret::Plain(p) if p.is_empty() => None,
            // postgres-protocol derives exactly as PostgreSQL does (16-byte random salt, 4096
            // iterations) and, unlike from_password, applies SASLprep to non-ASCII passwords.
            Secret::Plain(p) => {
                ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(p.as_bytes())).ok()
            }
            Secret::Scram {
                iterations,
                salt,
                stored_key,
                server_key,
            } => Some(ScramVerifier {
                iterations: *iterations,
                salt: salt.clone(),
                stored_key: *stored_key,
                server_key: *server_key,
            }),
            Secret::Md5(_) => None,
        }
    }
}

impl From<ScramVerifier> for Secret {
    fn from(v: ScramVerifier) -> Secret {
        Secret::Scram {
            iterations: v.iterations,
            salt: v.salt,
            stored_key: v.stored_key,
            server_key: v.server_key,
        }
    }
}

fn is_md5_secret(s: &str) -> bool {
    s.strip_prefix("md5").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// SCRAM-SHA-256 keys of one password, as PostgreSQL stores them.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// H(HMAC(SaltedPassword, "Client Key")): what a client proof is checked against.
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key"): what proves us to the client.
    pub server_key: [u8; 32],
}

// Stored and server keys let anyone impersonate the server to clients; keep them out of logs.
impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScramVerifier {{ iterations: {}, .. }}", self.iterations)
    }
}

impl ScramVerifier {
    /// Derives the keys from a password; no SASLprep, so this matches PostgreSQL exactly for ASCII passwords only.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        Self::from_password_bytes(password.as_bytes(), salt, iterations)
    }

    fn from_password_bytes(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted = hi(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(hmac(&salted, b"Client Key")).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>`.
    pub fn parse(s: &str) -> Result<ScramVerifier, AuthError> {
        let bad = AuthError::BadVerifier;
        let rest = s
            .strip_prefix(SCRAM_PREFIX)
            .ok_or(bad("does not start with \"SCRAM-SHA-256$\""))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(bad("missing '$' between salt and keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(bad("missing ':' between iterations and salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(bad("missing ':' between StoredKey and ServerKey"))?;
        // str::parse accepts a leading '+'; the stored form never has one.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("iteration count is not a decimal number"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| bad("iteration count is too large"))?;
        if iterations == 0 {
            return Err(bad("iteration count is zero"));
        }
        if iterations > MAX_ITERATIONS {
            return Err(bad("iteration count is above 10000000"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| bad("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(bad("salt is empty"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key32(stored_key).ok_or(bad("StoredKey is not 32 bytes of base64"))?,
            server_key: key32(server_key).ok_or(bad("ServerKey is not 32 bytes of base64"))?,
        })
    }

    /// The `SCRAM-SHA-256$…` form PostgreSQL keeps in pg_authid.rolpassword.
    pub fn to_postgres_string(&self) -> String {
        format!(
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// A verifier no password matches, for unknown users; `seed` should be random per process.
    pub fn mock(user: &str, seed: &[u8]) -> ScramVerifier {
        // Running the exchange to the end (as PostgreSQL's mock authentication does) with a salt
        // that is stable per name keeps probes from telling which users exist.
        let tagged = |tag: &[u8]| {
            let mut m = HmacSha256::new_from_slice(seed).expect("HMAC accepts keys of any length");
            m.update(tag);
            m.update(user.as_bytes());
            <[u8; 32]>::from(m.finalize().into_bytes())
        };
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: tagged(b"salt\0")[..DEFAULT_SALT_LEN].to_vec(),
            // Matching this would need a SHA-256 preimage.
            stored_key: tagged(b"stored\0"),
            server_key: tagged(b"server\0"),
        }
    }
}

fn key32(b64: &str) -> Option<[u8; 32]> {
    B64.decode(b64).ok()?.try_into().ok()
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// SCRAM's Hi(): PBKDF2-HMAC-SHA-256 with a single output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    // Cloning the keyed state skips re-deriving the HMAC pads each round: about twice as fast.
    let keyed = HmacSha256::new_from_slice(password).expect("HMAC accepts keys of any length");
    let mut m = keyed.clone();
    m.update(salt);
    m.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut m = keyed.clone();
        m.update(&u);
        u = m.finalize().into_bytes().into();
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// Compares without an early exit, so timing doesn't reveal how many leading bytes matched.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

enum ScramState {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// Echoed back base64-encoded in the client-final `c=` attribute.
        gs2_header: &'static str,
        client_first_bare: String,
        server_first: String,
        /// Client nonce followed by ours.
        nonce: String,
    },
    /// Succeeded or failed; either way a client gets one attempt per exchange.
    Finished,
}

/// Server side of one SCRAM-SHA-256 exchange (RFC 5802/7677 as PostgreSQL does it, no channel binding).
//
// gs2 header "n,," or "y,," is accepted; "p=…" is rejected since we never advertise -PLUS.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ScramState,
}

impl ScramServer {
    /// Starts an exchange against `verifier` with a fresh random server nonce.
    pub fn new(verifier: ScramVerifier) -> Self {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut raw);
        Self::with_server_nonce(verifier, B64.encode(raw))
    }

    /// Fixed nonces exist only so recorded exchanges can be replayed in tests.
    fn with_server_nonce(verifier: ScramVerifier, server_nonce: String) -> Self {
        ScramServer {
            verifier,
            server_nonce,
            state: ScramState::AwaitingClientFirst,
        }
    }

    /// Takes the body of SASLInitialResponse's data (client-first-message), returns server-first-message bytes.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ScramState::AwaitingClientFirst) {
            return Err(AuthError::OutOfOrder(
                "client-first-message after the exchange started",
            ));
        }
        self.state = ScramState::Finished;
        let msg = std::str::from_utf8(msg)
            .map_err(|_| AuthError::BadMessage("client-first-message is not UTF-8"))?;
        let (gs2_header, bare) = parse_gs2_header(msg)?;
        let client_nonce = parse_client_first_bare(bare)?;
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let out = server_first.clone().into_bytes();
        self.state = ScramState::AwaitingClientFinal {
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(out)
    }

    /// Takes client-final-message, checks the proof, returns server-final-message (`v=…`) bytes.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let ScramState::AwaitingClientFinal {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ScramState::Finished)
        else {
            return Err(AuthError::OutOfOrder(
                "client-final-message without a pending client-first-message",
            ));
        };
        let bad = AuthError::BadMessage;
        let msg = std::str::from_utf8(msg).map_err(|_| bad("client-final-message is not UTF-8"))?;
        // The proof must come last; everything before it is part of the signed AuthMessage.
        let (without_proof, proof) = msg
            .rsplit_once(',')
            .ok_or(bad("client-final-message has no proof"))?;
        let proof = proof.strip_prefix("p=").ok_or(bad(
            "the last attribute of client-final-message must be the proof (p=)",
        ))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(bad("client-final-message must start with c="))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(bad("missing nonce (r=) in client-final-message"))?;
        attrs.try_for_each(check_extension)?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| bad("channel-binding attribute is not valid base64"))?;
        if cbind != gs2_header.as_bytes() {
            return Err(bad(
                "channel-binding attribute does not match the gs2 header",
            ));
        }
        if client_nonce != nonce {
            return Err(bad("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| bad("proof is not valid base64"))?;
        let proof: [u8; 32] = proof.try_into().map_err(|_| bad("proof is not 32 bytes"))?;

        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key
            .iter_mut()
            .zip(client_signature)
            .for_each(|(k, s)| *k ^= s);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        if !ct_eq(&stored_key, &self.verifier.stored_key) {
            return Err(AuthError::PasswordMismatch);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// Splits off `gs2-cbind-flag "," [authzid] ","`, returning the canonical header and the rest.
fn parse_gs2_header(msg: &str) -> Result<(&'static str, &str), AuthError> {
    let bad = AuthError::BadMessage;
    let (flag, rest) = msg.split_once(',').ok_or(bad("missing gs2 header"))?;
    let header = match flag {
        "n" => "n,,",
        // "y": the client could bind but thinks we can't. True, as we never advertise -PLUS, so
        // this is not a downgrade.
        "y" => "y,,",
        f if f.starts_with("p=") => return Err(AuthError::ChannelBindingUnsupported),
        _ => return Err(bad("unexpected channel-binding flag")),
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(bad("gs2 header is not terminated"))?;
    match authzid {
        "" => Ok((header, bare)),
        a if a.starts_with("a=") => Err(bad("authorization identity is not supported")),
        _ => Err(bad("malformed authorization identity")),
    }
}

/// Checks `[reserved-mext ","] username "," nonce ["," extensions]` and returns the client nonce.
fn parse_client_first_bare(bare: &str) -> Result<&str, AuthError> {
    let bad = AuthError::BadMessage;
    let mut attrs = bare.split(',');
    let user = attrs.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(bad("mandatory SCRAM extensions are not supported"));
    }
    // The user comes from the startup packet (libpq sends an empty n=), so only the presence of
    // the attribute is checked, as PostgreSQL does.
    if !user.starts_with("n=") {
        return Err(bad("missing user name (n=) in client-first-message"));
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(bad("missing nonce (r=) in client-first-message"))?;
    // We echo the nonce back; RFC 5802 allows printable ASCII except ','.
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(bad("client nonce is empty or not printable ASCII"));
    }
    attrs.try_for_each(check_extension)?;
    Ok(nonce)
}

/// Optional extensions are ignored (as PostgreSQL does) but must still be `<letter>=<value>`.
fn check_extension(attr: &str) -> Result<(), AuthError> {
    match attr.as_bytes() {
        // Letters RFC 5802 already assigns would be a repeated or misplaced attribute.
        [k, b'=', ..] if b"acimnprsv".contains(k) => Err(AuthError::BadMessage(
            "repeated or misplaced SCRAM attribute",
        )),
        [k, b'=', v @ ..] if k.is_ascii_alphabetic() && !v.contains(&0) => Ok(()),
        _ => Err(AuthError::BadMessage("malformed SCRAM attribute")),
    }
}

/// Lowercase hex of md5 over the concatenation of `parts`.
fn md5_hex(parts: &[&[u8]]) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut h = md5::Md5::new();
    for p in parts {
        md5::Digest::update(&mut h, p);
    }
    let digest = h.finalize();
    let mut out = [0u8; 32];
    for (pair, b) in out.chunks_exact_mut(2).zip(digest.iter()) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// The 32 hex digits of a configured md5 secret.
fn md5_secret_hex(secret: &str) -> Result<&[u8], AuthError> {
    // Secret::parse only makes well-formed ones, but the variant is public.
    if !is_md5_secret(secret) {
        return Err(AuthError::BadMd5Secret);
    }
    Ok(&secret.as_bytes()[3..])
}

/// Checks an md5 PasswordMessage (without its NUL): "md5" + hex(md5(hex(md5(password || user)) || salt)).
pub fn verify_md5(
    secret: &Secret,
    user: &str,
    salt: [u8; 4],
    response: &[u8],
) -> Result<(), AuthError> {
    let inner = match secret {
        Secret::Plain(p) if p.is_empty() => return Err(AuthError::PasswordMismatch),
        Secret::Plain(p) => md5_hex(&[p.as_bytes(), user.as_bytes()]),
        Secret::Md5(h) => md5_secret_hex(h)?
            .try_into()
            .map_err(|_| AuthError::BadMd5Secret)?,
        Secret::Scram { .. } => return Err(AuthError::Md5NeedsPlainOrMd5Secret),
    };
    let mut expected = *b"md5________________________________";
    expected[3..].copy_from_slice(&md5_hex(&[&inner, &salt]));
    if ct_eq(&expected, response) {
        Ok(())
    } else {
        Err(AuthError::PasswordMismatch)
    }
}

/// Checks a cleartext password (auth method "password") against any kind of secret, in constant time.
pub fn verify_plain(secret: &Secret, user: &str, password: &[u8]) -> Result<(), AuthError> {
    // PostgreSQL rejects empty passwords before looking at the secret, and its passwords are C
    // strings; HMAC would also treat trailing NULs as key padding ("pw\0" deriving like "pw").
    if password.is_empty() || password.contains(&0) {
        return Err(AuthError::PasswordMismatch);
    }
    let ok = match secret {
        // Hashing first keeps the comparison from leaking the configured password's length.
        Secret::Plain(p) => ct_eq(&Sha256::digest(p.as_bytes()), &Sha256::digest(password)),
        Secret::Md5(h) => ct_eq(&md5_hex(&[password, user.as_bytes()]), md5_secret_hex(h)?),
        Secret::Scram { .. } => {
            let v = secret.scram_verifier().ok_or(AuthError::PasswordMismatch)?;
            scram_password_matches(&v, password)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::PasswordMismatch)
    }
}

fn scram_password_matches(v: &ScramVerifier, password: &[u8]) -> bool {
    // SASLprep is the identity on ASCII and is skipped (by PostgreSQL too) for non-UTF-8 bytes.
    let needs_saslprep = !password.is_ascii() && std::str::from_utf8(password).is_ok();
    if !needs_saslprep || v.iterations > CLIENT_LIB_MAX_ITERATIONS {
        let derived = ScramVerifier::from_password_bytes(password, &v.salt, v.iterations);
        return ct_eq(&derived.stored_key, &v.stored_key);
    }
    // SASLprep needs Unicode tables we don't carry; postgres-protocol's client applies it, so
    // let the client prove the password to our own server side in memory.
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let mut server = ScramServer::new(v.clone());
    let Ok(first) = server.client_first(client.message()) else {
        return false;
    };
    client.update(&first).is_ok() && server.client_final(client.message()).is_ok()
}

#[cfg(test)]
mod tests;
