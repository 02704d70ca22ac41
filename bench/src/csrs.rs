//! Device CSRs for issuance benchmarks: N fresh P-256 keys and PKCS#10 requests
//! (`CN = <prefix>-<7-digit index>`, 1-based), written as `<dir>/<name>.csr` (PEM), and
//! optionally a pallet CSV (`thing_name,csr`, absolute paths) for
//! `fleetcert provision --batch`. The keys are dropped: they stay "on the device".
use anyhow::{Context, Result, bail};
use fleetcert_ca::ThingName;
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Requests generated in memory before they are written (bounds memory for large N).
const CHUNK: usize = 4096;

/// What `fleetcert-bench csrs` makes.
#[derive(Debug, Clone)]
pub struct CsrsOptions {
    /// How many keys and CSRs, 1 to 9 999 999 (the index has 7 digits).
    pub count: usize,
    /// Directory for the `<name>.csr` files; created if missing.
    pub out: PathBuf,
    /// Names are `<prefix>-<7-digit index>`, so the prefix must keep them valid thing
    /// names.
    pub prefix: String,
    /// Where to write the `thing_name,csr` pallet CSV, if wanted.
    pub pallet: Option<PathBuf>,
}

/// The one-line JSON summary `fleetcert-bench csrs` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CsrsReport {
    /// CSRs written.
    pub count: usize,
    /// Always `p256`.
    pub key_algorithm: &'static str,
    /// Absolute path of the directory holding the `.csr` files.
    pub out: PathBuf,
    /// The pallet CSV, if one was asked for.
    pub pallet: Option<PathBuf>,
    /// Name of the first device (index 1).
    pub first: Option<String>,
    /// Name of the last device (index `count`).
    pub last: Option<String>,
    /// Wall-clock time of the whole run, including writing the files.
    pub seconds: f64,
}

/// The thing name (and CN) of device `index` (1-based).
pub fn device_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:07}")
}

/// One fresh P-256 key and a PEM PKCS#10 request for `name`, signed by that key.
pub fn csr_pem(name: &str) -> Result<String> {
    key_and_csr(name).map(|(_, csr)| csr)
}

/// One fresh P-256 key (PKCS#8 DER) and a PEM PKCS#10 request for `name` signed by it.
pub fn key_and_csr(name: &str) -> Result<(Vec<u8>, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate a P-256 key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let request = params
        .serialize_request(&key)
        .with_context(|| format!("cannot build the CSR for {name}"))?;
    let pem = request
        .pem()
        .with_context(|| format!("cannot encode the CSR for {name}"))?;
    Ok((key.serialize_der(), pem))
}

/// A CSV field as the csv crate reads it back (fields are trimmed on reading, so
/// surrounding whitespace cannot survive and is refused).
fn csv_field(value: &str) -> Result<String> {
    if value.contains(['\n', '\r']) || value.trim() != value {
        bail!("{value:?} cannot be written to the pallet CSV");
    }
    if value.contains([',', '"', '#']) {
        Ok(format!("\"{}\"", value.replace('"', "\"\"")))
    } else {
        Ok(value.to_owned())
    }
}

/// Generates `opts.count` keys and CSRs on the current rayon pool and writes them.
pub fn run(opts: &CsrsOptions) -> Result<CsrsReport> {
    if opts.count == 0 {
        bail!("--count must be at least 1");
    }
    if opts.count > 9_999_999 {
        bail!("--count must be at most 9999999 (the index has 7 digits)");
    }
    // The longest name must still be a valid thing name (and so a valid file name).
    ThingName::parse(&device_name(&opts.prefix, opts.count))
        .with_context(|| format!("--prefix {:?}", opts.prefix))?;

    let started = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let out = std::fs::canonicalize(&opts.out)
        .with_context(|| format!("cannot resolve {}", opts.out.display()))?;

    let mut pallet = match &opts.pallet {
        Some(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            writeln!(w, "thing_name,csr")?;
            Some((path, w))
        }
        None => None,
    };

    for start in (1..=opts.count).step_by(CHUNK) {
        let end = (start + CHUNK - 1).min(opts.count);
        let chunk: Vec<(String, String)> = (start..=end)
            .into_par_iter()
            .map(|i| {
                let name = device_name(&opts.prefix, i);
                let pem = csr_pem(&name)?;
                Ok((name, pem))
            })
            .collect::<Result<_>>()?;
        for (name, pem) in chunk {
            let path = out.join(format!("{name}.csr"));
            std::fs::write(&path, pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
            if let Some((pallet_path, w)) = pallet.as_mut() {
                let csr = path
                    .to_str()
                    .with_context(|| format!("{} is not valid UTF-8", path.display()))?;
                writeln!(w, "{},{}", name, csv_field(csr)?)
                    .with_context(|| format!("cannot write {}", pallet_path.display()))?;
            }
        }
    }
    let pallet = match pallet {
        Some((path, mut w)) => {
            w.flush()
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
        }
        None => None,
    };
    Ok(CsrsReport {
        count: opts.count,
        key_algorithm: "p256",
        out,
        pallet,
        first: Some(device_name(&opts.prefix, 1)),
        last: Some(device_name(&opts.prefix, opts.count)),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `fleetcert-bench csrs`: the command-line arguments.
#[derive(Debug, clap::Args)]
pub struct CsrsArgs {
    /// How many keys and CSRs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=9_999_999))]
    pub count: u64,
    /// Directory for the `<name>.csr` files (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Names are `<prefix>-<7-digit index>` (thing-name characters only).
    #[arg(long, default_value = "csr-device")]
    pub prefix: String,
    /// Also write a `thing_name,csr` CSV (absolute paths) for `fleetcert provision --batch`.
    #[arg(long)]
    pub pallet: Option<PathBuf>,
    /// Threads generating keys (default: the machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `fleetcert-bench csrs`; the summary is one line of JSON.
pub fn run_cli(args: CsrsArgs) -> std::result::Result<String, String> {
    let opts = CsrsOptions {
        count: usize::try_from(args.count).map_err(|e| format!("--count: {e}"))?,
        out: args.out,
        prefix: args.prefix,
        pallet: args.pallet,
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(threads) = args.threads {
        pool = pool.num_threads(threads.max(1));
    }
    let pool = pool
        .build()
        .map_err(|e| format!("cannot start the thread pool: {e}"))?;
    let report = pool.install(|| run(&opts)).map_err(|e| format!("{e:#}"))?;
    Ok(serde_json::to_string(&report).expect("report serialises"))
}

/// Reads a pallet written by [`run`]: `(thing_name, csr path)` per row.
pub fn read_pallet(path: &Path) -> Result<Vec<(String, PathBuf)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some("thing_name,csr") {
        bail!("{}: the header is not thing_name,csr", path.display());
    }
    lines
        .map(|line| {
            let (name, csr) = line
                .split_once(',')
                .with_context(|| format!("{}: bad row {line:?}", path.display()))?;
            let csr = match csr.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => csr.to_owned(),
            };
            Ok((name.to_owned(), PathBuf::from(csr)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcert_ca::{DeviceCsr, KeyAlgorithm};
    use rustls_pki_types::pem::PemObject as _;
    use std::collections::HashSet;

    #[test]
    fn writes_verifiable_csrs_and_a_pallet() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CsrsOptions {
            count: 5,
            out: dir.path().join("csrs"),
            prefix: "unit".into(),
            pallet: Some(dir.path().join("pallet.csv")),
        };
        let report = run(&opts).unwrap();
        assert_eq!(report.count, 5);
        assert_eq!(report.first.as_deref(), Some("unit-0000001"));
        assert_eq!(report.last.as_deref(), Some("unit-0000005"));
        assert!(report.out.is_absolute());

        let rows = read_pallet(&dir.path().join("pallet.csv")).unwrap();
        assert_eq!(rows.len(), 5);
        let mut keys = HashSet::new();
        for (i, (name, path)) in rows.iter().enumerate() {
            assert_eq!(name, &device_name("unit", i + 1));
            assert!(path.is_absolute(), "{}", path.display());
            assert!(path.is_file(), "{} does not exist", path.display());
            assert_eq!(path, &report.out.join(format!("{name}.csr")));
            let pem = std::fs::read(path).unwrap();
            assert!(pem.starts_with(b"-----BEGIN CERTIFICATE REQUEST-----"));
            // parse verifies the self-signature.
            let csr = DeviceCsr::parse(&pem).unwrap();
            assert_eq!(csr.common_name(), Some(name.as_str()));
            assert_eq!(csr.key_algorithm(), KeyAlgorithm::P256);
            assert!(keys.insert(csr.public_key_sha256_hex()), "key repeated");
        }
        assert_eq!(keys.len(), 5);
    }

    #[test]
    fn a_tampered_csr_does_not_verify() {
        let pem = csr_pem("unit-0000001").unwrap();
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut der = der.as_ref().to_vec();
        // Flip a bit inside the CN value (the subject is signed).
        let at = der.windows(12).position(|w| w == b"unit-0000001").unwrap();
        der[at] ^= 0x01;
        assert!(DeviceCsr::parse(&der).is_err());
    }

    #[test]
    fn refuses_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |count, prefix: &str| CsrsOptions {
            count,
            out: dir.path().join("x"),
            prefix: prefix.into(),
            pallet: None,
        };
        assert!(run(&opts(0, "ok")).is_err());
        assert!(run(&opts(1, "bad/prefix")).is_err());
        assert!(run(&opts(1, "")).is_ok());
        assert!(run(&opts(10_000_000, "ok")).is_err());
    }

    #[test]
    fn quotes_csv_fields_that_need_it() {
        assert_eq!(csv_field("/tmp/a.csr").unwrap(), "/tmp/a.csr");
        assert_eq!(csv_field("/tmp/a,b.csr").unwrap(), "\"/tmp/a,b.csr\"");
        assert_eq!(csv_field("/tmp/a\"b").unwrap(), "\"/tmp/a\"\"b\"");
        assert!(csv_field("/tmp/a\nb").is_err());
    }
}
