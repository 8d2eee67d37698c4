//! `storyfarm render` as an artist runs it: a subprocess on the example storyboard and the bundled
//! tiny model writing frames, a contact sheet and a manifest; interrupted (Ctrl-C, then SIGKILL)
//! and run again it resumes without rendering finished frames again and ends with the pictures of
//! an uninterrupted run; bad storyboard files give one clear line each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use storyfarm_diffusion::frames::compare_latents;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn storyfarm(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storyfarm"));
    c.env("HF_HUB_OFFLINE", "1")
        .env("STORYFARM_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE");
    c
}

fn render(data: &Path, board: &Path, out: &Path) -> Command {
    let mut c = storyfarm(data);
    c.arg("render").arg(board).arg("--out").arg(out);
    c
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The example storyboard made longer (more frames, more steps, one frame per task), so a run
/// lasts long enough to be interrupted between frames.
fn long_board(dir: &Path) -> PathBuf {
    let example = std::fs::read_to_string(repo().join("examples/tiny-board.yaml")).unwrap();
    std::fs::copy(
        repo().join("examples/style-geometric.png"),
        dir.join("style-geometric.png"),
    )
    .unwrap();
    let mut board = example
        .replace(
            "../tests/fixtures/models/tiny-sd15",
            &repo()
                .join("tests/fixtures/models/tiny-sd15")
                .display()
                .to_string(),
        )
        .replace("steps: 6", "steps: 24")
        .replace("frames_per_task: 2", "frames_per_task: 1");
    for i in 0..4 {
        board.push_str(&format!(
            "  - prompt: a second chapter, scene {i}, flat illustration\n"
        ));
    }
    let path = dir.join("long-board.yaml");
    std::fs::write(&path, board).unwrap();
    path
}

fn frame_files(out: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("frame-") && name.ends_with(".png") {
            let meta = entry.metadata().unwrap();
            files.insert(
                name,
                (
                    std::fs::read(entry.path()).unwrap(),
                    meta.modified().unwrap(),
                ),
            );
        }
    }
    files
}

/// Waits until `at_least` frames are on disk, then signals the run; returns the frames then.
fn interrupt_after(mut child: Child, out: &Path, at_least: usize, signal: &str) -> (Output, usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = frame_files(out).len();
        if n >= at_least {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("render ended ({status}) before {at_least} frames were written");
        }
        assert!(
            Instant::now() < deadline,
            "no {at_least} frames within 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = frame_files(out).len();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
    (child.wait_with_output().unwrap(), seen)
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

fn latents(data: &Path, frame: &serde_json::Value) -> Vec<u8> {
    let key = frame["latents_key"].as_str().expect("latents_key");
    std::fs::read(data.join("artifacts").join(key)).unwrap()
}

#[test]
fn render_writes_frames_sheet_and_manifest_and_resumes_after_interrupts() {
    let tmp = tempfile::tempdir().unwrap();
    let board = long_board(tmp.path());
    let (data, out) = (tmp.path().join("data"), tmp.path().join("out"));

    // Ctrl-C after two frames: exit 130, finished frames on disk, a line saying how to resume.
    let child = render(&data, &board, &out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The same storyboard in the same data directory from a second process: refused in one
    // line while the first runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    while frame_files(&out).is_empty() {
        assert!(Instant::now() < deadline, "no frame within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let twin = render(&data, &board, &tmp.path().join("twin"))
        .output()
        .unwrap();
    assert_eq!(twin.status.code(), Some(1), "{}", text(&twin));
    assert!(
        String::from_utf8_lossy(&twin.stderr)
            .contains("is being rendered by another storyfarm process"),
        "{}",
        text(&twin)
    );
    let (first, _) = interrupt_after(child, &out, 2, "-INT");
    assert_eq!(first.status.code(), Some(130), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("run the same command again to resume"),
        "{}",
        text(&first)
    );
    assert!(
        !out.join("manifest.json").exists(),
        "an interrupted run wrote a manifest"
    );

    // Killed outright after one more frame: nothing to clean up, the database survives.
    let child = render(&data, &board, &out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let before_kill = frame_files(&out).len();
    let (second, _) = interrupt_after(child, &out, before_kill + 1, "-KILL");
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("resuming job"),
        "{}",
        text(&second)
    );

    let finished = frame_files(&out);
    assert!(
        finished.len() >= 3 && finished.len() < 8,
        "{} frames before the last run",
        finished.len()
    );
    let last_started = chrono::Utc::now();
    let third = render(&data, &board, &out).output().unwrap();
    assert!(third.status.success(), "{}", text(&third));
    let stderr = String::from_utf8_lossy(&third.stderr);
    let resumed: usize = stderr
        .split("resuming job ")
        .nth(1)
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume line: {stderr}"));
    assert!(
        resumed >= finished.len(),
        "{resumed} frames counted as done, {} were on disk",
        finished.len()
    );

    // Frames finished before were neither rendered nor written again.
    let after = frame_files(&out);
    assert_eq!(after.len(), 8, "{:?}", after.keys());
    let m = manifest(&out);
    let frames = m["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 8);
    for (name, (bytes, modified)) in &finished {
        assert_eq!(&after[name].0, bytes, "{name} changed");
        assert_eq!(after[name].1, *modified, "{name} was written again");
        let index: usize = name[6..9].parse::<usize>().unwrap() - 1;
        let finished_at =
            chrono::DateTime::parse_from_rfc3339(frames[index]["finished_at"].as_str().unwrap())
                .unwrap();
        assert!(
            finished_at < last_started,
            "{name} finished at {finished_at}, after the last run began ({last_started})"
        );
    }

    // The manifest names every frame with its seed, file and hash; the sheet is a picture of them all.
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["state"], "succeeded");
        assert_eq!(f["file"], format!("frame-{:03}.png", i + 1));
        let bytes = &after[f["file"].as_str().unwrap()].0;
        assert_eq!(
            f["png_sha256"].as_str().unwrap(),
            storyfarm_core::keys::sha256_hex(bytes)
        );
    }
    assert_eq!(frames[3]["seed"], 7, "explicit seed");
    assert_eq!(frames[4]["seed"], 104, "default seed: base + index");
    assert_eq!(
        m["style"]["prompt"],
        "a colorful geometric pattern, flat illustration"
    );
    assert_eq!(
        m["contact_sheets"],
        serde_json::json!(["contact-sheet.png"])
    );
    let sheet = image::open(out.join(m["contact_sheets"][0].as_str().unwrap())).unwrap();
    assert!(
        sheet.width() >= 3 * 128 && sheet.height() >= 3 * 128,
        "{}x{}",
        sheet.width(),
        sheet.height()
    );

    // A run that was never interrupted (its own data dir, two workers) gives the same frames.
    let (data2, out2) = (tmp.path().join("data2"), tmp.path().join("out2"));
    let clean = render(&data2, &board, &out2)
        .args(["--workers", "2"])
        .output()
        .unwrap();
    assert!(clean.status.success(), "{}", text(&clean));
    let m2 = manifest(&out2);
    for (a, b) in frames.iter().zip(m2["frames"].as_array().unwrap()) {
        let (diff, scale) = compare_latents(&latents(&data, a), &latents(&data2, b)).unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "frame {}: {diff} of {scale}",
            a["index"]
        );
    }

    // Run again: nothing is rendered, the outputs are rewritten from the store.
    let again = render(&data, &board, &out).output().unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("all 8 frames were rendered by an earlier run"),
        "{}",
        text(&again)
    );
}

#[test]
fn the_example_storyboard_renders_as_the_readme_says() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = render(
        &tmp.path().join("data"),
        &repo().join("examples/tiny-board.yaml"),
        &out,
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for i in 1..=4 {
        let img = image::open(out.join(format!("frame-{i:03}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    assert!(out.join("contact-sheet.png").is_file());
    assert_eq!(manifest(&out)["frames"].as_array().unwrap().len(), 4);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        out.display().to_string()
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(1 inversion task(s)"),
        "{}",
        text(&o)
    );

    // Another storyboard in the same style reuses the inversion cached in the data directory.
    let example = std::fs::read_to_string(repo().join("examples/tiny-board.yaml")).unwrap();
    std::fs::copy(
        repo().join("examples/style-geometric.png"),
        tmp.path().join("style-geometric.png"),
    )
    .unwrap();
    let sequel = tmp.path().join("sequel.yaml");
    let model = repo()
        .join("tests/fixtures/models/tiny-sd15")
        .display()
        .to_string();
    std::fs::write(
        &sequel,
        example
            .replace("a fox in the snow", "a fox asleep in the snow")
            .replace("../tests/fixtures/models/tiny-sd15", &model),
    )
    .unwrap();
    let o = render(
        &tmp.path().join("data"),
        &sequel,
        &tmp.path().join("sequel"),
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(0 inversion task(s)"),
        "{}",
        text(&o)
    );

    // --model renders the same board on another model (SDXL here): a new inversion, new frames.
    let sdxl = repo().join("tests/fixtures/models/tiny-sdxl");
    let xl_out = tmp.path().join("xl");
    let o = render(
        &tmp.path().join("data"),
        &repo().join("examples/tiny-board.yaml"),
        &xl_out,
    )
    .arg("--model")
    .arg(&sdxl)
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(1 inversion task(s)"),
        "{}",
        text(&o)
    );
    let m = manifest(&xl_out);
    assert_eq!(
        m["model"].as_str().unwrap(),
        sdxl.canonicalize().unwrap().display().to_string()
    );
    assert_ne!(
        m["frames"][0]["png_sha256"],
        manifest(&out)["frames"][0]["png_sha256"]
    );
}

/// The character example: a style generated from its prompt, a character from its description and
/// one from a picture. Anchors land beside the frames and on the contact sheet; a second board
/// with the same characters and style in the same data directory computes nothing again.
#[test]
fn the_character_example_renders_its_anchors_and_reuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    let board = repo().join("examples/tiny-characters.yaml");
    let o = render(&data, &board, &out).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("(1 inversion task(s), 2 anchor task(s), 3 render task(s))"),
        "{}",
        text(&o)
    );
    // The watch stream reports each character's anchors as they become ready.
    for name in ["Biscuit", "Captain"] {
        assert!(
            stderr.contains(&format!("anchors of {name} ready (2)")),
            "{}",
            text(&o)
        );
    }
    let m = manifest(&out);
    assert_eq!(m["style"]["image"], serde_json::Value::Null);
    assert_eq!(m["style"]["generated_seed"].as_u64(), Some(299));
    let generated = image::open(out.join("style-generated.png")).unwrap();
    assert_eq!((generated.width(), generated.height()), (64, 64));
    let characters = m["characters"].as_array().unwrap();
    let names: Vec<&str> = characters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Biscuit", "Captain"]);
    assert!(characters[1]["image_sha256"].is_string());
    for c in characters {
        assert_eq!(c["state"].as_str(), Some("ready"));
        for f in c["anchor_files"].as_array().unwrap() {
            let img = image::open(out.join(f["file"].as_str().unwrap())).unwrap();
            assert_eq!((img.width(), img.height()), (64, 64));
        }
    }
    assert_eq!(m["frames"].as_array().unwrap().len(), 3);
    assert!(m["frames"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["state"].as_str() == Some("succeeded")));
    assert!(out.join("contact-sheet.png").is_file());

    // A sequel with the same characters and style: no inversion, no anchors, one render task.
    let example = std::fs::read_to_string(&board).unwrap();
    std::fs::copy(
        repo().join("examples/character-sailor.png"),
        tmp.path().join("character-sailor.png"),
    )
    .unwrap();
    let model = repo()
        .join("tests/fixtures/models/tiny-sd15")
        .display()
        .to_string();
    let frames_at = example.find("frames:").unwrap();
    let sequel = tmp.path().join("sequel.yaml");
    std::fs::write(
        &sequel,
        example[..frames_at].replace("../tests/fixtures/models/tiny-sd15", &model)
            + "frames:\n  - prompt: a dog and a sailor in a harbour, flat illustration\n    characters: [Biscuit, Captain]\n",
    )
    .unwrap();
    let o = render(&data, &sequel, &tmp.path().join("sequel"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("(0 inversion task(s), 0 anchor task(s), 1 render task(s))"),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_storyboard_files_give_one_clear_line_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        repo().join("examples/style-geometric.png"),
        dir.join("style.png"),
    )
    .unwrap();
    std::fs::write(
        dir.join("broken.png"),
        b"\x89PNG\r\n\x1a\nthis is not a picture",
    )
    .unwrap();
    let model = repo()
        .join("tests/fixtures/models/tiny-sd15")
        .display()
        .to_string();
    let good = format!("model: {model}\nwidth: 64\nheight: 64\nsteps: 2\nstyle:\n  image: style.png\n  prompt: geometric\nframes:\n  - prompt: a fox\n  - prompt: a boat\n");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("malformed", "model: m\nframes: [\n  - prompt: a\n".into(), vec!["malformed.yaml", "line"]),
        ("unknown-key", good.replace("steps: 2", "stepz: 2"), vec!["unknown field `stepz`", "line 4"]),
        ("missing-image", good.replace("image: style.png", "image: nowhere.png"), vec!["style.image", "nowhere.png"]),
        ("unreadable-image", good.replace("image: style.png", "image: broken.png"), vec!["style.image", "broken.png", "not a readable image"]),
        ("bad-width", good.replace("width: 64", "width: 100"), vec!["width", "100"]),
        ("empty-prompt", good.replace("prompt: a boat", "prompt: ''"), vec!["frames[1].prompt"]),
        ("no-frames", good.split("frames:").next().unwrap().to_string() + "frames: []\n", vec!["frames"]),
        ("bad-model", good.replace(&model, "not a model!"), vec!["not a model!"]),
        (
            "unknown-character",
            good.replace("  - prompt: a boat\n", "  - prompt: a dog on a boat\n    characters: [Rex]\n"),
            vec!["frames[1].characters[0]", "Rex"],
        ),
        (
            "subject-word-not-in-prompt",
            good.replace("frames:\n", "characters:\n  - name: Rex\n    description: a small dog\n    subject_words: [dog]\nframes:\n")
                .replace("  - prompt: a boat\n", "  - prompt: a puppy on a boat\n    characters: [Rex]\n"),
            vec!["frames[1]", "dog"],
        ),
        (
            "unreadable-character-image",
            good.replace("frames:\n", "characters:\n  - name: Rex\n    description: a small dog\n    subject_words: [dog]\n    image: broken.png\nframes:\n"),
            vec!["characters[0].image", "broken.png", "not a readable image"],
        ),
    ];
    for (name, yaml, needles) in cases {
        let board = dir.join(format!("{name}.yaml"));
        std::fs::write(&board, yaml).unwrap();
        let o = render(&dir.join("data"), &board, &dir.join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{name}: expected one line, got {stderr}");
        assert!(lines[0].starts_with("error: "), "{name}: {stderr}");
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "{name}: {needle:?} not in {stderr}"
            );
        }
    }
    let missing = render(
        &dir.join("data"),
        &dir.join("absent.yaml"),
        &dir.join("out"),
    )
    .output()
    .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("absent.yaml"),
        "{}",
        text(&missing)
    );
}

#[test]
fn every_example_storyboard_is_valid_and_its_style_image_reads() {
    let mut boards = 0;
    for entry in std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let spec = storyfarm_core::StoryboardSpec::load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let style = spec
            .style
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no style reference", path.display()));
        let pictures = style
            .image
            .iter()
            .chain(spec.characters.iter().filter_map(|c| c.image.as_ref()));
        for picture in pictures {
            image::open(picture).unwrap_or_else(|e| panic!("{}: {e}", picture.display()));
        }
        boards += 1;
    }
    assert!(boards >= 2, "{boards} example storyboards");
}

#[test]
fn long_storyboards_get_contact_sheet_pages() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("examples/style-geometric.png"),
        tmp.path().join("style.png"),
    )
    .unwrap();
    let mut board = format!(
        "model: {}\nwidth: 64\nheight: 64\nsteps: 2\nframes_per_task: 25\nstyle:\n  image: style.png\n  prompt: geometric\nframes:\n",
        repo().join("tests/fixtures/models/tiny-sd15").display()
    );
    for i in 0..50 {
        board.push_str(&format!("  - prompt: panel {i}\n"));
    }
    std::fs::write(tmp.path().join("fifty.yaml"), board).unwrap();
    let out = tmp.path().join("out");
    let o = render(
        &tmp.path().join("data"),
        &tmp.path().join("fifty.yaml"),
        &out,
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let m = manifest(&out);
    assert_eq!(
        m["contact_sheets"],
        serde_json::json!(["contact-sheet-01.png", "contact-sheet-02.png"])
    );
    let (first, second) = (
        image::open(out.join("contact-sheet-01.png")).unwrap(),
        image::open(out.join("contact-sheet-02.png")).unwrap(),
    );
    // The style and 48 frames on the first page (9 rows of 6), the style and 2 frames on the second (one row).
    assert!(
        first.height() > 3 * second.height(),
        "{}x{} vs {}x{}",
        first.width(),
        first.height(),
        second.width(),
        second.height()
    );
    assert_eq!(m["frames"].as_array().unwrap().len(), 50);
}
