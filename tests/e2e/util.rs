use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetcert");

/// A scratch environment: its own data directory and output directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub database_url: Option<String>,
    pub passphrase: Option<String>,
}

impl Env {
    pub fn new() -> Self {
        Env {
            dir: tempfile::Builder::new()
                .prefix("fleetcert-e2e-")
                .tempdir()
                .unwrap(),
            database_url: None,
            passphrase: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path("data")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.path("out")
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("FLEETCERT_CA_PASSPHRASE")
            .env_remove("FLEETCERT_DATABASE_URL")
            .env_remove("FLEETCERT_CRL_URL")
            .env("FLEETCERT_DATA_DIR", self.data_dir())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        if let Some(url) = &self.database_url {
            cmd.env("FLEETCERT_DATABASE_URL", url);
        }
        if let Some(p) = &self.passphrase {
            cmd.env("FLEETCERT_CA_PASSPHRASE", p);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs and asserts exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fleetcert {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts the exit code; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "fleetcert {args:?}: expected exit {code}:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full)).unwrap()
    }

    pub fn init_ca(&self) {
        self.ok(&["ca", "init", "--crl-url", "http://127.0.0.1:9090/crl"]);
    }

    /// Provisions `devices` generated-key things named `<prefix>-00000`… by batch, with
    /// `days` of validity, into `out/`.
    pub fn provision_pallet(&self, prefix: &str, devices: usize, days: u32) {
        let csv = self.path(&format!("{prefix}.csv"));
        let body: String = (0..devices).map(|i| format!("{prefix}-{i:05}\n")).collect();
        std::fs::write(&csv, format!("thing_name\n{body}")).unwrap();
        self.ok(&[
            "provision",
            "--batch",
            csv.to_str().unwrap(),
            "--days",
            &days.to_string(),
            "--out",
            "out",
        ]);
    }

    /// All certificates in the registry.
    pub fn certs(&self) -> Vec<serde_json::Value> {
        self.json(&["certs", "list"]).as_array().unwrap().clone()
    }

    pub fn chain_files(&self) -> (PathBuf, PathBuf) {
        let root = self.path("root.pem");
        let issuing = self.path("issuing.pem");
        std::fs::write(&root, self.ok(&["ca", "export"])).unwrap();
        let chain = self.ok(&["ca", "export", "--chain"]);
        let first_end = chain.find("-----END CERTIFICATE-----").unwrap() + 26;
        std::fs::write(&issuing, &chain[..first_end]).unwrap();
        (root, issuing)
    }

    /// `openssl verify` of a device certificate against the exported chain.
    pub fn openssl_verify(&self, cert: &Path) -> Output {
        let (root, issuing) = self.chain_files();
        Command::new("openssl")
            .args(["verify", "-purpose", "sslclient", "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(&issuing)
            .arg(cert)
            .output()
            .unwrap()
    }
}

/// Runs openssl, asserting success; returns stdout.
pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Makes a CSR with the real openssl: `key_args` like `["-newkey", "ec", "-pkeyopt",
/// "ec_paramgen_curve:P-256"]`, asking for `subject` and whatever `extra` adds.
pub fn openssl_csr(
    dir: &Path,
    name: &str,
    key_args: &[&str],
    subject: &str,
    extra: &[&str],
) -> PathBuf {
    let csr = dir.join(format!("{name}.csr"));
    let key = dir.join(format!("{name}.devkey"));
    let mut args = vec!["req", "-new", "-nodes", "-subj", subject, "-keyout"];
    args.push(key.to_str().unwrap());
    args.extend_from_slice(&["-out", csr.to_str().unwrap()]);
    args.extend_from_slice(key_args);
    args.extend_from_slice(extra);
    openssl(&args);
    csr
}

pub fn p256_csr(dir: &Path, name: &str) -> PathBuf {
    openssl_csr(
        dir,
        name,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &format!("/CN={name}"),
        &[],
    )
}

/// Every file name in a directory (sorted); empty if it does not exist.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Serial (lowercase hex) of a PEM certificate file, read with fleetcert-ca.
pub fn serial_of(cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    fleetcert_ca::describe_certificate(&pem).unwrap().serial_hex
}
