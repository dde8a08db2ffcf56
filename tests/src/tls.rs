//! Certificates for the TLS tests, made by the `openssl` command (Debian's) in a temporary
//! directory: a CA, a server certificate it signs for `127.0.0.1` and `localhost`, and a
//! second CA that signed nothing, which a client can be told to trust so that it does not
//! trust the server.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA, a server key and certificate, and an unrelated CA.
pub struct TestPki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl, installed by scripts/tools.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA in `<name>.pem`, its key in `<name>.key`.
fn ca(dir: &Path, name: &str) {
    let (key, pem, subject) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN=weir test {name}"),
    );
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem,
            "-days", "2", "-subj", &subject,
        ],
    );
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        ca(d, "ca");
        ca(d, "other-ca");
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("extensions");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
        Self { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// A CA that signed nothing here: a client trusting only it rejects the server.
    pub fn untrusted_ca(&self) -> PathBuf {
        self.file("other-ca.pem")
    }

    /// The server's certificate (PEM).
    pub fn server_certificate(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The server's private key (PKCS#8 PEM, not encrypted).
    pub fn server_key(&self) -> PathBuf {
        self.file("server.key")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
