use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::common::*;

fn finetune_cmd(dir: &Path, model: &Path, name: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypersphere"));
    cmd.current_dir(dir).arg("finetune");
    let own = [
        "train.steps=300",
        "train.warmup_steps=5",
        "train.lr=1e-3",
        "train.eval_every_steps=1",
        "train.checkpoint_every_steps=5",
        "train.keep_checkpoints=3",
        // A 1000x LayerNorm rate at lr 1e-3 trains a random tiny model into a collapse.
        "train.norm_lr_scale=1",
    ];
    for s in tiny_run(model, name).into_iter().chain(own.map(String::from)) {
        cmd.args(["--set", &s]);
    }
    cmd
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(_, v)| v.dtype() == candle_core::DType::F32)
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// SIGKILL a run mid-way, corrupt its newest checkpoint, resume: the final weights equal an
/// uninterrupted run's, bit for bit.
#[test]
fn killed_run_resumes_to_the_same_weights() {
    kill_corrupt_resume(&[]);
}

/// The same with STS-B dev selection at every step: the resumed run picks the same step and
/// exports the same weights (the best weights kept in `best/` survive the kill).
#[test]
fn killed_run_with_selection_resumes_to_the_same_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sts_dev_folder(tmp.path());
    let data = format!("--data={}", data.display());
    let run = kill_corrupt_resume(&["--set", "train.select=\"stsb-dev\"", &data]);
    let report = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.path().join(format!("runs/{name}/report.json"))).unwrap())
            .unwrap()
    };
    let (full, killed) = (report("full"), report("killed"));
    assert_eq!(full["train"]["selected"]["by"], "stsb-dev");
    assert_eq!(full["train"]["selected"], killed["train"]["selected"]);
}

/// Run "full" to the end; run "killed" with the same settings, SIGKILL it once two checkpoints
/// exist, tear the newest, resume; the exported weights must be equal bit for bit.
fn kill_corrupt_resume(extra: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 11, "");
    let model_dir = model.config.parent().unwrap();
    let full = finetune_cmd(tmp.path(), model_dir, "full").args(extra).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));

    let mut child = finetune_cmd(tmp.path(), model_dir, "killed")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = tmp.path().join("runs/killed/checkpoints");
    let start = Instant::now();
    // Kill once at least two checkpoints exist (so one can be corrupted and another used).
    while hypersphere::checkpoint::list(&tmp.path().join("runs/killed")).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoints appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !tmp.path().join("runs/killed/model").exists(),
        "the run finished before the kill: the test proves nothing"
    );
    let list = hypersphere::checkpoint::list(&tmp.path().join("runs/killed"));
    let newest = list.last().unwrap();
    // A torn write: the newest checkpoint's weights cut in half.
    let f = newest.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();

    let resumed = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .current_dir(tmp.path())
        .args(["finetune", "--resume", "runs/killed"])
        .args(extra.iter().filter(|a| a.starts_with("--data")))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("skipping checkpoint") && stderr.contains("resuming from"), "{stderr}");
    assert!(checkpoints.is_dir());
    let a = weights(&tmp.path().join("runs/full/model/model.safetensors"));
    let b = weights(&tmp.path().join("runs/killed/model/model.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    // The log has each validation step once, with the same training means as the uninterrupted
    // run's: a line after the resume averages the steps since the previous line, not since the
    // resume.
    let log = |name: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(tmp.path().join(format!("runs/{name}/log.jsonl"))).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (full_log, killed_log) = (log("full"), log("killed"));
    let steps = |l: &[serde_json::Value]| l.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(steps(&killed_log), steps(&full_log));
    assert_eq!(steps(&full_log).last(), Some(&300));
    for (a, b) in full_log.iter().zip(&killed_log) {
        assert_eq!(a["train"], b["train"], "step {}", a["step"]);
    }
    // The report covers the whole run and says it was resumed.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/killed/report.json")).unwrap()).unwrap();
    let resumed_at = report["train"]["resumed_at"].as_u64().unwrap();
    assert!(resumed_at > 0 && resumed_at < 300, "{resumed_at}");
    let (secs, speed) =
        (report["train"]["seconds"].as_f64().unwrap(), report["train"]["pairs_per_s"].as_f64().unwrap());
    assert!((speed - 300.0 * 8.0 / secs).abs() < 1e-6 * speed, "whole-run speed: {speed} vs 2400 pairs / {secs} s");
    let last_elapsed = killed_log.last().unwrap()["elapsed_s"].as_f64().unwrap();
    assert!(secs >= last_elapsed, "seconds {secs} cover the whole run, the last line at {last_elapsed}");
    tmp
}

/// Validations less often than checkpoints: the first log line after the resume still averages
/// the steps since the previous line (the sums travel in the checkpoint).
#[test]
fn killed_run_resumes_with_the_same_log() {
    kill_corrupt_resume(&["--set", "train.eval_every_steps=7"]);
}

/// An absurd learning rate blows the weights up after the first update, so the loss turns
/// non-finite: such steps are skipped and counted, then the run stops with advice.
#[test]
fn non_finite_loss_stops_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let files = tiny_model(&tmp.path().join("tiny"), 12, "");
    let out = finetune_cmd(tmp.path(), files.config.parent().unwrap(), "nan")
        .args(["--set", "train.max_bad_steps=2", "--set", "train.lr=1e30", "--set", "train.warmup_steps=0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 bad steps") && stderr.contains("lower train.lr"), "{stderr}");
    assert_eq!(stderr.matches("skipped without an update").count(), 2, "{stderr}");
    // One account of what is left (issue 25: it said both "kept" and "no checkpoint yet").
    assert!(!stderr.contains("checkpoint is kept") && stderr.contains("no checkpoint yet"), "{stderr}");
}

/// Ctrl-C (SIGINT) finishes the step, writes a checkpoint and exits 1 naming `--resume`;
/// resuming then completes the run.
#[test]
fn interrupt_writes_a_checkpoint_then_resume_finishes() {
    signal_writes_a_checkpoint_then_resume_finishes("-INT");
}

/// SIGTERM (`timeout`, schedulers, `docker stop`) is treated like the first Ctrl-C.
#[test]
fn sigterm_writes_a_checkpoint_then_resume_finishes() {
    signal_writes_a_checkpoint_then_resume_finishes("-TERM");
}

fn signal_writes_a_checkpoint_then_resume_finishes(signal: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 13, "");
    let run = tmp.path().join("runs/int");
    let child = finetune_cmd(tmp.path(), model.config.parent().unwrap(), "int")
        .args(["--set", "train.checkpoint_every_steps=1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // Wait until training has started (the log gets its first line), then interrupt.
    while std::fs::read_to_string(run.join("log.jsonl")).map(|l| l.is_empty()).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted at step") && stderr.contains("--resume"), "{stderr}");
    let saved = hypersphere::checkpoint::list(&run);
    assert_eq!(saved.len(), 1, "one checkpoint, written on the interrupt");
    assert!(!run.join("model").exists());
    let resumed = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .current_dir(tmp.path())
        .args(["finetune", "--resume", "runs/int"])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(run.join("model/model.safetensors").is_file());
}

/// One writer per run folder: a second finetune into a folder in use, or a second resume of
/// it, is refused naming the process; once the first ends the folder is free again.
#[test]
fn a_run_folder_has_one_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 13, "");
    let run = tmp.path().join("runs/one");
    let mut first = finetune_cmd(tmp.path(), model.config.parent().unwrap(), "one")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("run.toml").is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "the first run did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = first.id().to_string();
    for second in [
        finetune_cmd(tmp.path(), model.config.parent().unwrap(), "one").args(["--force"]).output().unwrap(),
        Command::new(env!("CARGO_BIN_EXE_hypersphere"))
            .current_dir(tmp.path())
            .args(["finetune", "--resume", "runs/one"])
            .output()
            .unwrap(),
    ] {
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "{stderr}");
        assert!(stderr.contains("in use by process") && stderr.contains(&pid), "{stderr}");
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The killed process's lock went with it; --force moves its leftovers aside.
    let out = finetune_cmd(tmp.path(), model.config.parent().unwrap(), "one")
        .args(["--force", "--set", "train.steps=2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let aside: Vec<_> = std::fs::read_dir(tmp.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("one.old-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(run.join("model/model.safetensors").is_file());
}

/// A resume may extend the budget (recorded in run.toml, so the next resume agrees) but not
/// change what the steps compute.
#[test]
fn resume_records_allowed_changes_and_refuses_others() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 13, "");
    let run = tmp.path().join("runs/ext");
    let out = finetune_cmd(tmp.path(), model.config.parent().unwrap(), "ext")
        .args(["--set", "train.steps=3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resume = |set: &str| {
        Command::new(env!("CARGO_BIN_EXE_hypersphere"))
            .current_dir(tmp.path())
            .args(["finetune", "--resume", "runs/ext", "--set", set])
            .output()
            .unwrap()
    };
    let refused = resume("loss.t=5");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("cannot change loss.t"), "{stderr}");
    let extended = resume("train.steps=5");
    assert!(extended.status.success(), "{}", String::from_utf8_lossy(&extended.stderr));
    let saved = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(saved.contains("# resumed with train.steps = 5 (was 3)") && saved.contains("steps = 5"), "{saved}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["train"]["steps"], 5);
    // A budget below the checkpoint's step is refused, not "trained 5 of 2 steps".
    let shrunk = resume("train.steps=2");
    let stderr = String::from_utf8_lossy(&shrunk.stderr);
    assert!(!shrunk.status.success() && stderr.contains("train.steps of at least 5"), "{stderr}");
}

/// A checkpoint that cannot be written (here its folder's path is taken by a file, as a full
/// disk would fail it) stops the run with a message naming the step, the last good
/// checkpoint and the resume command (issue 25).
#[test]
fn a_failed_checkpoint_write_names_the_last_good_one_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("tiny"), 13, "");
    let run = tmp.path().join("runs/full");
    let first = finetune_cmd(tmp.path(), model.config.parent().unwrap(), "full")
        .args(["--set", "train.steps=5"])
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // Take the checkpoints' folder away: the resume starts over and cannot write step 5's.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("checkpoints"), "not a folder").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypersphere"))
        .current_dir(tmp.path())
        .args(["finetune", "--resume", "runs/full", "--set", "train.steps=10"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("writing the checkpoint of step 5")
            && stderr.contains("the last good one: none yet")
            && stderr.contains("--resume runs/full"),
        "{stderr}"
    );
}
