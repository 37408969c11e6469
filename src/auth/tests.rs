//! Tests of the authentication pieces, including known answers from PostgreSQL 15.
use super::*;
use postgres_protocol::authentication::md5_hash;

/// From PostgreSQL 15.18: `SET password_encryption='scram-sha-256'; CREATE ROLE kat LOGIN PASSWORD 'kat-pw'`.
const PG_KAT: &str = "SCRAM-SHA-256$4096:1H5UCwFM9TncGNWMb60UjQ==$l4e/6GpbXbmR9SkRTwEs7NSi3NA2kpcAM/V1siNW0Cg=:Y9Ow8mNmaBt17A93G/kPYeb30YToAu5xagRMb6R3xJA=";
/// From PostgreSQL 15.18, password 'ﬁ-pw' (U+FB01 ligature), which SASLprep maps to "fi-pw".
const PG_KAT_LIGATURE: &str = "SCRAM-SHA-256$4096:r7PXAj+JIJ2VxvjLsLrytg==$p5gvCMJvYVmikov/89LrOcvCyEXeAdWw6gzEUTkMrV0=:uMhY1hr2r1J5DM/sVRbqyRfe3jEWoaTDaJUP0Jsn+Pc=";
/// From PostgreSQL 15.18: `SET password_encryption='md5'; CREATE ROLE katmd5 LOGIN PASSWORD 'kat-pw'`.
const PG_KAT_MD5: &str = "md548fdc449143a3fdc9c2a5410a2058efa";

/// A whole exchange with postgres-protocol's client, which also checks our server signature.
fn exchange_with(
    verifier: ScramVerifier,
    password: &str,
    cb: ChannelBinding,
) -> Result<(), AuthError> {
    let mut server = ScramServer::new(verifier);
    let mut client = ScramSha256::new(password.as_bytes(), cb);
    let first = server.client_first(client.message())?;
    client
        .update(&first)
        .expect("client accepts server-first-message");
    let fin = server.client_final(client.message())?;
    client
        .finish(&fin)
        .expect("client accepts our server signature");
    Ok(())
}

fn exchange(verifier: ScramVerifier, password: &str) -> Result<(), AuthError> {
    exchange_with(verifier, password, ChannelBinding::unsupported())
}

fn scram(s: &str) -> ScramVerifier {
    Secret::parse(s).unwrap().scram_verifier().unwrap()
}

#[test]
fn scram_exchange_with_plain_secret() {
    let secret = Secret::parse("s3cret").unwrap();
    assert_eq!(secret, Secret::Plain("s3cret".into()));
    let v = secret.scram_verifier().unwrap();
    assert_eq!(
        (v.iterations, v.salt.len()),
        (DEFAULT_ITERATIONS, DEFAULT_SALT_LEN)
    );
    exchange(v.clone(), "s3cret").unwrap();
    // "y,,": the client could bind but we don't offer -PLUS.
    exchange_with(v, "s3cret", ChannelBinding::unrequested()).unwrap();
    // Fresh salt per derivation.
    assert_ne!(scram("s3cret").salt, scram("s3cret").salt);
}

#[test]
fn scram_exchange_with_stored_verifier() {
    let text =
        ScramVerifier::from_password("hunter2", b"0123456789abcdef", 4096).to_postgres_string();
    let secret = Secret::parse(&text).unwrap();
    assert!(matches!(
        secret,
        Secret::Scram {
            iterations: 4096,
            ..
        }
    ));
    exchange(secret.scram_verifier().unwrap(), "hunter2").unwrap();
    exchange_with(
        secret.scram_verifier().unwrap(),
        "hunter2",
        ChannelBinding::unrequested(),
    )
    .unwrap();
}

#[test]
fn scram_wrong_password() {
    assert_eq!(
        exchange(scram("s3cret"), "s3cret "),
        Err(AuthError::PasswordMismatch)
    );
    assert_eq!(
        exchange(scram(PG_KAT), "kat-pW"),
        Err(AuthError::PasswordMismatch)
    );
    assert_eq!(
        exchange(scram(PG_KAT), ""),
        Err(AuthError::PasswordMismatch)
    );
}

#[test]
fn postgres_made_scram_verifier() {
    let v = scram(PG_KAT);
    assert_eq!(v.iterations, 4096);
    assert_eq!(
        ScramVerifier::from_password("kat-pw", &v.salt, v.iterations),
        v
    );
    assert_eq!(v.to_postgres_string(), PG_KAT);
    exchange(v.clone(), "kat-pw").unwrap();
    let secret = Secret::from(v);
    verify_plain(&secret, "kat", b"kat-pw").unwrap();
    assert_eq!(
        verify_plain(&secret, "kat", b"kat-pw\0"),
        Err(AuthError::PasswordMismatch)
    );
}

#[test]
fn postgres_applies_saslprep_and_so_do_we_where_it_matters() {
    let v = scram(PG_KAT_LIGATURE);
    // PostgreSQL derived the keys from the SASLprep'd form.
    assert_eq!(
        ScramVerifier::from_password("fi-pw", &v.salt, v.iterations),
        v
    );
    assert_ne!(
        ScramVerifier::from_password("ﬁ-pw", &v.salt, v.iterations),
        v
    );
    // Clients SASLprep too.
    exchange(v.clone(), "ﬁ-pw").unwrap();
    let secret = Secret::from(v);
    verify_plain(&secret, "katuni", "ﬁ-pw".as_bytes()).unwrap();
    verify_plain(&secret, "katuni", b"fi-pw").unwrap();
    assert_eq!(
        verify_plain(&secret, "katuni", "ﬂ-pw".as_bytes()),
        Err(AuthError::PasswordMismatch)
    );
    // A plaintext non-ASCII secret gets a SASLprep'd verifier, as PostgreSQL would store.
    let v = scram("ﬁ-pw");
    exchange(v.clone(), "ﬁ-pw").unwrap();
    exchange(v, "fi-pw").unwrap();
}

/// psql against PostgreSQL as recorded in postgres-protocol's tests: same nonce, same server messages.
#[test]
fn replays_recorded_psql_exchange() {
    let v = ScramVerifier::from_password("foobar", &B64.decode("fs3IXBy7U7+IvVjZ").unwrap(), 4096);
    let mut server = ScramServer::with_server_nonce(v, "jx/oIRLs02gGSHcw1KEty3eY".into());
    let first = server
        .client_first(b"n,,n=,r=9IZ2O01zb9IgiIZ1WJ/zgpJB")
        .unwrap();
    assert_eq!(
        first,
        b"r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i=4096"
    );
    let fin = server
        .client_final(b"c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,p=AmNKosjJzS31NTlQYNs5BTeQjdHdk7lOflDo5re2an8=")
        .unwrap();
    assert_eq!(fin, b"v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=");
}

/// RFC 7677 section 3 test vector (note the non-empty n=, which we ignore).
#[test]
fn rfc7677_vector() {
    let v = ScramVerifier::from_password(
        "pencil",
        &B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
        4096,
    );
    let mut server = ScramServer::with_server_nonce(v, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
    let first = server
        .client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
        .unwrap();
    assert_eq!(
        first,
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let fin = server
        .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        .unwrap();
    assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
}

#[test]
fn server_nonce_is_fresh_and_appended_to_the_client_nonce() {
    let v = ScramVerifier::from_password("x", b"salt", 1);
    let nonce_of = |server: &mut ScramServer| {
        let first =
            String::from_utf8(server.client_first(b"n,,n=,r=clientnonce").unwrap()).unwrap();
        first
            .strip_prefix("r=clientnonce")
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_owned()
    };
    let a = nonce_of(&mut ScramServer::new(v.clone()));
    let b = nonce_of(&mut ScramServer::new(v));
    assert_eq!(a.len(), 24);
    assert_eq!(B64.decode(&a).unwrap().len(), SERVER_NONCE_LEN);
    assert_ne!(a, b);
}

#[test]
fn postgres_made_md5_secret() {
    let secret = Secret::parse(PG_KAT_MD5).unwrap();
    assert_eq!(
        secret,
        Secret::Md5(postgres_protocol::password::md5(b"kat-pw", "katmd5"))
    );
    let salt = [0x2a, 0x3d, 0x8f, 0xe0];
    let response = md5_hash(b"katmd5", b"kat-pw", salt);
    verify_md5(&secret, "katmd5", salt, response.as_bytes()).unwrap();
    verify_md5(
        &Secret::Plain("kat-pw".into()),
        "katmd5",
        salt,
        response.as_bytes(),
    )
    .unwrap();
    verify_plain(&secret, "katmd5", b"kat-pw").unwrap();
    // The hash is salted with the user name.
    assert_eq!(
        verify_plain(&secret, "kat", b"kat-pw"),
        Err(AuthError::PasswordMismatch)
    );
}

#[test]
fn md5_challenge() {
    // postgres-protocol's own known answer.
    let salt = [0x2a, 0x3d, 0x8f, 0xe0];
    let good = b"md562af4dd09bbb41884907a838a3233294";
    let plain = Secret::Plain("password".into());
    let hashed = Secret::parse(&postgres_protocol::password::md5(b"password", "md5_user")).unwrap();
    for s in [&plain, &hashed] {
        verify_md5(s, "md5_user", salt, good).unwrap();
        let mismatch = Err(AuthError::PasswordMismatch);
        assert_eq!(verify_md5(s, "md5_user", [0, 0, 0, 0], good), mismatch);
        assert_eq!(verify_md5(s, "md5_user", salt, &good[..34]), mismatch);
        assert_eq!(
            verify_md5(s, "md5_user", salt, &[good.as_slice(), b"\0"].concat()),
            mismatch
        );
        assert_eq!(
            verify_md5(s, "md5_user", salt, b"md562AF4DD09BBB41884907A838A3233294"),
            mismatch
        );
        assert_eq!(verify_md5(s, "md5_user", salt, b"password"), mismatch);
        assert_eq!(verify_md5(s, "md5_user", salt, b""), mismatch);
        assert_eq!(verify_md5(s, "md5_user", salt, b"\xff\xfe"), mismatch);
    }
    // The user salts the inner hash, which an md5 secret already contains.
    assert_eq!(
        verify_md5(&plain, "other", salt, good),
        Err(AuthError::PasswordMismatch)
    );
    verify_md5(&hashed, "other", salt, good).unwrap();
    let wrong = md5_hash(b"md5_user", b"passwore", salt);
    assert_eq!(
        verify_md5(&plain, "md5_user", salt, wrong.as_bytes()),
        Err(AuthError::PasswordMismatch)
    );
    assert_eq!(
        verify_md5(&Secret::parse(PG_KAT).unwrap(), "kat", salt, good),
        Err(AuthError::Md5NeedsPlainOrMd5Secret)
    );
    assert!(AuthError::Md5NeedsPlainOrMd5Secret
        .to_string()
        .contains("plaintext or md5 secret"));
    // Empty passwords never authenticate, whatever the client sends.
    let empty = md5_hash(b"u", b"", salt);
    assert_eq!(
        verify_md5(&Secret::Plain(String::new()), "u", salt, empty.as_bytes()),
        Err(AuthError::PasswordMismatch)
    );
    // Hand-built Md5 secrets that Secret::parse would not have produced.
    for bad in [
        "",
        "md5",
        "md5xyz",
        "MD5ABCDEF0123456789ABCDEF0123456789",
        "md5é123456789abcdef0123456789abcd",
    ] {
        assert_eq!(
            verify_md5(&Secret::Md5(bad.into()), "u", salt, good),
            Err(AuthError::BadMd5Secret),
            "{bad}"
        );
        assert_eq!(
            verify_plain(&Secret::Md5(bad.into()), "u", b"pw"),
            Err(AuthError::BadMd5Secret),
            "{bad}"
        );
    }
}

#[test]
fn plain_password() {
    let mismatch = Err(AuthError::PasswordMismatch);
    let plain = Secret::Plain("kat-pw".into());
    verify_plain(&plain, "kat", b"kat-pw").unwrap();
    for wrong in [
        &b"kat-p"[..],
        b"kat-pw ",
        b"KAT-PW",
        b"",
        b"\xff",
        b"kat-pw\0",
    ] {
        assert_eq!(verify_plain(&plain, "kat", wrong), mismatch);
    }
    assert_eq!(
        verify_plain(&Secret::Plain(String::new()), "kat", b""),
        mismatch
    );
    let md5 = Secret::Md5(postgres_protocol::password::md5(b"kat-pw", "kat"));
    verify_plain(&md5, "kat", b"kat-pw").unwrap();
    assert_eq!(verify_plain(&md5, "kat", b"kat-px"), mismatch);
    assert_eq!(verify_plain(&md5, "kat", b""), mismatch);
    // Non-UTF-8 passwords are legal in PostgreSQL and skip SASLprep.
    let raw = Secret::from(ScramVerifier::from_password_bytes(b"\xffpw", b"salt", 16));
    verify_plain(&raw, "u", b"\xffpw").unwrap();
    assert_eq!(verify_plain(&raw, "u", b"\xfepw"), mismatch);
    // Past postgres-protocol's iteration cap, non-ASCII falls back to our unprepped derivation.
    let many = Secret::from(ScramVerifier::from_password(
        "pässwörd",
        b"salt",
        CLIENT_LIB_MAX_ITERATIONS + 1,
    ));
    verify_plain(&many, "u", "pässwörd".as_bytes()).unwrap();
}

#[test]
fn secret_kinds_are_detected() {
    assert!(matches!(Secret::parse(PG_KAT_MD5), Ok(Secret::Md5(_))));
    for plain in [
        "",
        "md5",
        "md548fdc449143a3fdc9c2a5410a2058ef",
        "md548fdc449143a3fdc9c2a5410a2058efa0",
        "md548FDC449143A3FDC9C2A5410A2058EFA",
        "MD548fdc449143a3fdc9c2a5410a2058efa",
        "md548fdc449143a3fdc9c2a5410a2058efg",
        "scram-sha-256$4096:c2FsdA==$x:y",
        "SCRAM-SHA-256",
        "pässwörd",
    ] {
        assert_eq!(
            Secret::parse(plain),
            Ok(Secret::Plain(plain.into())),
            "{plain}"
        );
    }
    assert_eq!(Secret::Plain(String::new()).scram_verifier(), None);
    assert_eq!(Secret::parse(PG_KAT_MD5).unwrap().scram_verifier(), None);
}

#[test]
fn secrets_are_not_printed() {
    let shown = format!(
        "{:?} {:?} {:?} {:?}",
        Secret::Plain("hunter2".into()),
        Secret::parse(PG_KAT).unwrap(),
        Secret::parse(PG_KAT_MD5).unwrap(),
        scram(PG_KAT)
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("48fdc449") && !shown.contains("1H5UCwFM"),
        "{shown}"
    );
    assert!(shown.contains("4096"), "{shown}");
}

#[test]
fn malformed_verifiers_are_named() {
    let key = "l4e/6GpbXbmR9SkRTwEs7NSi3NA2kpcAM/V1siNW0Cg=";
    let cases: &[(String, &str)] = &[
        ("SCRAM-SHA-256$".into(), "missing '$'"),
        ("SCRAM-SHA-256$4096:c2FsdA==".into(), "missing '$'"),
        (
            format!("SCRAM-SHA-256$4096c2FsdA==${key}:{key}"),
            "between iterations and salt",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}{key}"),
            "between StoredKey and ServerKey",
        ),
        (
            format!("SCRAM-SHA-256$:c2FsdA==${key}:{key}"),
            "not a decimal number",
        ),
        (
            format!("SCRAM-SHA-256$+4096:c2FsdA==${key}:{key}"),
            "not a decimal number",
        ),
        (
            format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
            "not a decimal number",
        ),
        (
            format!("SCRAM-SHA-256$4k:c2FsdA==${key}:{key}"),
            "not a decimal number",
        ),
        (format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"), "zero"),
        (
            format!("SCRAM-SHA-256$10000001:c2FsdA==${key}:{key}"),
            "above 10000000",
        ),
        (
            format!("SCRAM-SHA-256$4294967295:c2FsdA==${key}:{key}"),
            "above 10000000",
        ),
        (
            format!("SCRAM-SHA-256$99999999999999999999:c2FsdA==${key}:{key}"),
            "too large",
        ),
        (format!("SCRAM-SHA-256$4096:${key}:{key}"), "salt is empty"),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA=${key}:{key}"),
            "salt is not valid base64",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2F sdA==${key}:{key}"),
            "salt is not valid base64",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==$AAAA:{key}"),
            "StoredKey",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:!!!!"),
            "ServerKey",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}:{key}"),
            "ServerKey",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}$"),
            "ServerKey",
        ),
        (
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}\n"),
            "ServerKey",
        ),
    ];
    for (text, needle) in cases {
        let err = Secret::parse(text).unwrap_err();
        assert!(matches!(err, AuthError::BadVerifier(_)), "{text}: {err:?}");
        assert!(err.to_string().contains(needle), "{text}: {err}");
    }
    assert!(ScramVerifier::parse("md5abc")
        .unwrap_err()
        .to_string()
        .contains("SCRAM-SHA-256$"));
    // The cap itself is fine.
    let at_cap = format!("SCRAM-SHA-256$10000000:c2FsdA==${key}:{key}");
    assert_eq!(scram(&at_cap).iterations, MAX_ITERATIONS);
}

/// A server that has accepted client-first "n,,n=,r=abc" with server nonce "SRV".
fn after_first() -> ScramServer {
    let mut s = ScramServer::with_server_nonce(
        ScramVerifier::from_password("pw", b"salt", 1),
        "SRV".into(),
    );
    assert_eq!(
        s.client_first(b"n,,n=,r=abc").unwrap(),
        b"r=abcSRV,s=c2FsdA==,i=1"
    );
    s
}

/// A correct client-final for after_first() and password "pw", built by hand so parts can be varied.
fn final_for(without_proof: &str, first_bare: &str) -> String {
    let v = ScramVerifier::from_password("pw", b"salt", 1);
    let salted = hi(b"pw", b"salt", 1);
    let client_key = hmac(&salted, b"Client Key");
    let auth = format!("{first_bare},r=abcSRV,s=c2FsdA==,i=1,{without_proof}");
    let sig = hmac(&v.stored_key, auth.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(sig).map(|(k, s)| k ^ s).collect();
    format!("{without_proof},p={}", B64.encode(proof))
}

#[test]
fn hand_built_final_and_extensions_are_accepted() {
    after_first()
        .client_final(final_for("c=biws,r=abcSRV", "n=,r=abc").as_bytes())
        .unwrap();
    // Optional extensions are ignored but signed.
    let mut s = ScramServer::with_server_nonce(
        ScramVerifier::from_password("pw", b"salt", 1),
        "SRV".into(),
    );
    s.client_first(b"n,,n=someone,r=abc,x=1").unwrap();
    s.client_final(final_for("c=biws,r=abcSRV,z=ext", "n=someone,r=abc,x=1").as_bytes())
        .unwrap();
    // Tampering with a signed part breaks the proof.
    let tampered = final_for("c=biws,r=abcSRV,z=ext", "n=,r=abc").replace("z=ext", "z=exu");
    assert_eq!(
        after_first().client_final(tampered.as_bytes()),
        Err(AuthError::PasswordMismatch)
    );
}

#[test]
fn garbage_client_first_is_rejected() {
    let v = ScramVerifier::from_password("pw", b"salt", 1);
    let cases: &[(&[u8], &str)] = &[
        (b"", "missing gs2 header"),
        (b"\xff\xfe", "not UTF-8"),
        (b"n,,n=,r=ab\xc3", "not UTF-8"),
        (b"n", "missing gs2 header"),
        (b"n,", "not terminated"),
        (b"n,,", "missing user name"),
        (b",,n=,r=abc", "channel-binding flag"),
        (b"x,,n=,r=abc", "channel-binding flag"),
        (b"nn,,n=,r=abc", "channel-binding flag"),
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        (b"p=,,n=,r=abc", "channel binding"),
        (
            b"n,a=bob,n=,r=abc",
            "authorization identity is not supported",
        ),
        (b"n,bob,n=,r=abc", "malformed authorization identity"),
        (b"n,,m=ext,n=,r=abc", "mandatory"),
        (b"n,,r=abc", "missing user name"),
        (b"n,,n=", "missing nonce"),
        (b"n,,n=,", "missing nonce"),
        (b"n,,n=,r=", "nonce is empty"),
        (b"n,,n=,x=abc", "missing nonce"),
        (b"n,,n=,r=a b", "not printable"),
        (b"n,,n=,r=a\x01b", "not printable"),
        (b"n,,n=,r=\xc3\xa9", "not printable"),
        (b"n,,n=,r=abc,", "malformed SCRAM attribute"),
        (b"n,,n=,r=abc,x", "malformed SCRAM attribute"),
        (b"n,,n=,r=abc,1=2", "malformed SCRAM attribute"),
        (b"n,,n=,r=abc,x=\0", "malformed SCRAM attribute"),
        (b"n,,n=,r=abc,r=def", "repeated or misplaced"),
        (b"n,,n=,r=abc,p=def", "repeated or misplaced"),
    ];
    for (msg, needle) in cases {
        let mut s = ScramServer::new(v.clone());
        let err = s.client_first(msg).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{:?}: {err}",
            String::from_utf8_lossy(msg)
        );
        // A failed exchange stays failed.
        assert!(matches!(
            s.client_first(b"n,,n=,r=abc"),
            Err(AuthError::OutOfOrder(_))
        ));
        assert!(matches!(
            s.client_final(b"c=biws,r=abc,p=AAAA"),
            Err(AuthError::OutOfOrder(_))
        ));
    }
    assert_eq!(
        ScramServer::new(v).client_first(b"p=tls-unique,,n=,r=abc"),
        Err(AuthError::ChannelBindingUnsupported)
    );
}

#[test]
fn garbage_client_final_is_rejected() {
    let good = final_for("c=biws,r=abcSRV", "n=,r=abc");
    let proof = good.rsplit_once(",p=").unwrap().1.to_owned();
    let owned: Vec<(String, &str)> = vec![
        (String::new(), "no proof"),
        (format!("c=biws,r=abcSRV,p={proof},"), "must be the proof"),
        (
            format!("c=biws,r=abcSRV,p={proof},x=1"),
            "must be the proof",
        ),
        (
            format!("c=biws,r=abcSRV,p={proof},p={proof}"),
            "repeated or misplaced",
        ),
        (
            format!("c=biws,r=abcSRV,r=abcSRV,p={proof}"),
            "repeated or misplaced",
        ),
        (format!("r=abcSRV,c=biws,p={proof}"), "must start with c="),
        (format!("c=biws,p={proof}"), "missing nonce"),
        (format!("c=biws,x=abcSRV,p={proof}"), "missing nonce"),
        (format!("p={proof}"), "no proof"),
        (format!(",p={proof}"), "must start with c="),
        (
            format!("c=biws,r=abcSRV,,p={proof}"),
            "malformed SCRAM attribute",
        ),
        (format!("c=bi ws,r=abcSRV,p={proof}"), "not valid base64"),
        (format!("c=biw,r=abcSRV,p={proof}"), "not valid base64"),
        (
            format!("c=eSws,r=abcSRV,p={proof}"),
            "does not match the gs2 header",
        ),
        (
            format!("c=,r=abcSRV,p={proof}"),
            "does not match the gs2 header",
        ),
        (
            format!("c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=abcSRV,p={proof}"),
            "does not match the gs2 header",
        ),
        (format!("c=biws,r=abc,p={proof}"), "nonce does not match"),
        (
            format!("c=biws,r=abcSRVx,p={proof}"),
            "nonce does not match",
        ),
        (format!("c=biws,r=,p={proof}"), "nonce does not match"),
        (format!("c=biws,r=xbcSRV,p={proof}"), "nonce does not match"),
        ("c=biws,r=abcSRV,p=".into(), "proof is not 32 bytes"),
        ("c=biws,r=abcSRV,p=AAAA".into(), "proof is not 32 bytes"),
        (
            format!("c=biws,r=abcSRV,p={}", B64.encode([0u8; 33])),
            "proof is not 32 bytes",
        ),
        ("c=biws,r=abcSRV,p=!!!!".into(), "proof is not valid base64"),
        (
            format!("c=biws,r=abcSRV,p={}", &proof[..proof.len() - 1]),
            "proof is not valid base64",
        ),
        (
            format!("c=biws,r=abcSRV,p={}", B64.encode([0u8; 32])),
            "password authentication failed",
        ),
    ];
    let mut cases: Vec<(Vec<u8>, &str)> = owned
        .into_iter()
        .map(|(m, n)| (m.into_bytes(), n))
        .collect();
    cases.push((b"\xff".to_vec(), "not UTF-8"));
    cases.push(([good.as_bytes(), b"\xff"].concat(), "not UTF-8"));
    for (msg, needle) in cases {
        let mut s = after_first();
        let err = s.client_final(&msg).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{:?}: {err}",
            String::from_utf8_lossy(&msg)
        );
        // One attempt per exchange: even the right answer is refused afterwards.
        assert!(matches!(
            s.client_final(good.as_bytes()),
            Err(AuthError::OutOfOrder(_))
        ));
    }
    after_first().client_final(good.as_bytes()).unwrap();
}

#[test]
fn messages_out_of_order() {
    let v = ScramVerifier::from_password("pw", b"salt", 1);
    let mut s = ScramServer::new(v);
    assert!(matches!(
        s.client_final(b"c=biws,r=abc,p=AAAA"),
        Err(AuthError::OutOfOrder(_))
    ));
    let mut s = after_first();
    assert!(matches!(
        s.client_first(b"n,,n=,r=abc"),
        Err(AuthError::OutOfOrder(_))
    ));
    let good = final_for("c=biws,r=abcSRV", "n=,r=abc");
    let mut s = after_first();
    s.client_final(good.as_bytes()).unwrap();
    assert!(matches!(
        s.client_final(good.as_bytes()),
        Err(AuthError::OutOfOrder(_))
    ));
    assert!(matches!(
        s.client_first(b"n,,n=,r=abc"),
        Err(AuthError::OutOfOrder(_))
    ));
}

#[test]
fn mock_verifier_never_matches_and_is_stable_per_user() {
    let seed = [7u8; 32];
    let alice = ScramVerifier::mock("alice", &seed);
    assert_eq!(alice, ScramVerifier::mock("alice", &seed));
    assert_ne!(alice.salt, ScramVerifier::mock("bob", &seed).salt);
    assert_ne!(alice.salt, ScramVerifier::mock("alice", &[8u8; 32]).salt);
    assert_eq!(
        (alice.iterations, alice.salt.len()),
        (DEFAULT_ITERATIONS, DEFAULT_SALT_LEN)
    );
    assert_eq!(
        exchange(alice.clone(), ""),
        Err(AuthError::PasswordMismatch)
    );
    assert_eq!(exchange(alice, "alice"), Err(AuthError::PasswordMismatch));
}

/// Cheap deterministic fuzzing of every parser that sees untrusted or configured bytes.
#[test]
fn random_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let good = final_for("c=biws,r=abcSRV", "n=,r=abc").into_bytes();
    let seeds: [&[u8]; 4] = [
        b"n,,n=,r=abc,x=1",
        &good,
        PG_KAT.as_bytes(),
        b"md548fdc449143a3fdc9c2a5410a2058efa",
    ];
    let alphabet = b"nyprcmas=,$:+/0123456789ABCabc\0\xff\xc3";
    let secret = Secret::Plain("pw".into());
    for round in 0..20_000 {
        let seed = seeds[round % seeds.len()];
        let mut msg = seed.to_vec();
        for _ in 0..(next() % 4) {
            let r = next() as usize;
            let byte = alphabet[r % alphabet.len()];
            match r % 3 {
                0 if !msg.is_empty() => {
                    let i = (r >> 8) % msg.len();
                    msg[i] = byte;
                }
                1 if !msg.is_empty() => {
                    msg.truncate((r >> 8) % msg.len());
                }
                _ => msg.insert((r >> 8) % (msg.len() + 1), byte),
            }
        }
        let text = String::from_utf8_lossy(&msg);
        if let Ok(Secret::Scram { iterations, .. }) = Secret::parse(&text) {
            assert!((1..=MAX_ITERATIONS).contains(&iterations));
        }
        let _ = ScramServer::new(ScramVerifier::from_password("pw", b"salt", 1)).client_first(&msg);
        let _ = after_first().client_final(&msg);
        let _ = verify_md5(&secret, "u", [1, 2, 3, 4], &msg);
        let _ = verify_md5(
            &Secret::Md5(text.clone().into_owned()),
            "u",
            [1, 2, 3, 4],
            &msg,
        );
    }
}
