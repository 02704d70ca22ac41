use crate::util::*;

#[test]
fn demo_runs_the_factory_line_end_to_end() {
    let env = Env::new();
    let out = env.json(&["demo", "--devices", "200"]);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["provision"]["issued"], 200);
    assert_eq!(out["verified"], 200);
    assert_eq!(out["private_keys_mode_0600"], 200);
    assert_eq!(out["rerun"]["skipped"], 200);
    assert_eq!(out["registry"]["things"], 200);
    // Every device then connected over mutual TLS: first provisioned, then known.
    assert_eq!(out["jitp"]["first"]["ok"], 200, "{out}");
    assert_eq!(out["jitp"]["returning"]["ok"], 200, "{out}");
    // The temporary data directory is gone afterwards.
    assert!(!std::path::Path::new(out["data_dir"].as_str().unwrap()).exists());
}
