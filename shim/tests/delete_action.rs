//! The `delete` action of containerd-shim-skiff-v1, which containerd 1.6 runs after every
//! task delete and for a shim that died: on a bundle whose container is gone it cleans up
//! what is left and answers with a DeleteResponse protobuf on stdout (and nothing else).
//! Create/start/wait/kill/delete through a real containerd run in every end-to-end test
//! of tests/ (the agent's default shim).

use std::process::Command;

use containerd_shim::{DeleteResponse, protos::protobuf::Message};

#[test]
fn delete_of_a_gone_container_answers_with_a_delete_response() {
    let bundle = std::env::temp_dir().join(format!("skiff-shim-delete-{}", std::process::id()));
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(bundle.join("init.pid"), "4242\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-skiff-v1"))
        .args(["-namespace", "skiff-shim-test", "-id", "gone", "-bundle"])
        .arg(&bundle)
        .args(["-address", "/nonexistent/containerd.sock", "delete"])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", "/nonexistent/containerd.sock.ttrpc")
        .output()
        .expect("run the shim");
    let _ = std::fs::remove_dir_all(&bundle);
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = DeleteResponse::parse_from_bytes(&out.stdout).expect("a DeleteResponse");
    assert_eq!(resp.pid, 4242, "the init's pid from the bundle");
    assert_eq!(resp.exit_status, 137, "reported as killed");
    assert!(resp.exited_at.seconds > 0, "with a time");
}

#[test]
fn without_an_action_it_says_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-skiff-v1"))
        .args([
            "-namespace",
            "n",
            "-id",
            "x",
            "-address",
            "/nonexistent.sock",
        ])
        .env("TTRPC_ADDRESS", "/nonexistent.sock.ttrpc")
        .output()
        .expect("run the shim");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
