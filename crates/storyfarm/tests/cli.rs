//! `storyfarm generate` as a user runs it: a subprocess on the tiny models writing PNGs, and
//! one clear line for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn storyfarm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storyfarm"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "{} is not a PNG", path.display());
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn generate_with_style_image_writes_frames() {
    let out = tempfile::tempdir().unwrap();
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let dir = out.path().join(model);
        let status = storyfarm()
            .args(["generate", "--model"])
            .arg(fixtures().join("models").join(model))
            .args([
                "--prompt",
                "a red barn",
                "--prompt",
                "a lighthouse",
                "--steps",
                "4",
                "--width",
                "96",
                "--height",
                "64",
            ])
            .arg("--style-image")
            .arg(fixtures().join("sd15/inversion_image.png"))
            .args([
                "--style-prompt",
                "a colorful geometric pattern",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        for name in ["frame-001.png", "frame-002.png", "reference.png"] {
            assert_eq!(png_size(&dir.join(name)), (96, 64), "{model}/{name}");
        }
        let listed = String::from_utf8_lossy(&status.stdout);
        assert!(listed.contains("frame-002.png"), "{listed}");
    }
}

#[test]
fn same_seed_same_frame() {
    let out = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let dir = out.path().join(name);
        let s = storyfarm()
            .args(["generate", "--model"])
            .arg(fixtures().join("models/tiny-sd15"))
            .args([
                "--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64", "--seed",
                "11", "--out",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(s.success());
        std::fs::read(dir.join("frame-001.png")).unwrap()
    };
    assert_eq!(run("a"), run("b"));
}

#[test]
fn bad_input_is_one_clear_error() {
    let model = fixtures().join("models/tiny-sd15");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--height".into(), "60".into()],
            "`height`: must be a positive multiple of 8, got 60",
        ),
        (
            vec![
                "--height".into(),
                "64".into(),
                "--style-image".into(),
                "/nonexistent/style.png".into(),
                "--style-prompt".into(),
                "x".into(),
            ],
            "/nonexistent/style.png",
        ),
        (
            vec![
                "--height".into(),
                "64".into(),
                "--style-image".into(),
                fixtures()
                    .join("sd15/inversion_image.png")
                    .display()
                    .to_string(),
            ],
            "--style-prompt",
        ),
    ];
    for (extra, needle) in cases {
        let out = storyfarm()
            .args(["generate", "--model"])
            .arg(&model)
            .args([
                "--prompt",
                "x",
                "--steps",
                "2",
                "--width",
                "64",
                "--out",
                "/tmp/storyfarm-never-written",
            ])
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let out = storyfarm()
        .args([
            "generate",
            "--model",
            "no-such-org/no-such-model",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-org/no-such-model") && stderr.contains("--model"),
        "{stderr}"
    );
}
