//! Loading device identities from a directory.
use fleetcert_bench::certs::list_devices;
use std::fs;

#[test]
fn pairs_sorted_chain_and_other_files_skipped() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "b.crt",
        "b.key",
        "a.crt",
        "a.key",
        "chain.pem",
        "notes.txt",
        "orphan.key",
    ] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    let devices = list_devices(dir.path()).unwrap();
    let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(devices[0].cert, dir.path().join("a.crt"));
    assert_eq!(devices[0].key, dir.path().join("a.key"));
}

#[test]
fn a_certificate_without_its_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.crt", "a.key", "lonely.crt", "chain.pem"] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    let error = format!("{:#}", list_devices(dir.path()).unwrap_err());
    assert!(error.contains("lonely.crt has no key"), "{error}");
}

#[test]
fn an_empty_or_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("chain.pem"), "x").unwrap();
    assert!(list_devices(dir.path()).is_err());
    assert!(list_devices(&dir.path().join("missing")).is_err());
}
