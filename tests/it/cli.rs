//! Black-box tests of the `mistral-bot` binary: one-shot and console modes, and every
//! bad input the CLI must explain with a non-zero exit.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::util::test_model;

const BIN: &str = env!("CARGO_BIN_EXE_mistral-bot");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env("MISTRAL_BOT_THREADS", "1")
        .output()
        .expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a failed run whose stderr mentions `needle`.
fn assert_fails_with(output: &Output, needle: &str) {
    assert!(
        !output.status.success(),
        "expected failure; stderr: {}",
        stderr(output)
    );
    assert!(
        stderr(output).contains(needle),
        "stderr should mention {needle:?}: {}",
        stderr(output)
    );
    assert!(!stderr(output).contains("panicked"), "{}", stderr(output));
}

#[test]
fn prompt_mode_answers_on_stdout() {
    let model = test_model();
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "--prompt",
        "What is the capital of France? Answer in one word.",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("Paris"),
        "stdout: {}",
        stdout(&output)
    );
}

#[test]
fn console_mode_keeps_history_and_resets() {
    let model = test_model();
    let mut child = Command::new(BIN)
        .args([
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--console",
        ])
        .env("MISTRAL_BOT_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France? Answer in one word.\n/reset\n/exit\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.contains("Paris"), "{out}");
    assert!(out.contains("(conversation cleared)"), "{out}");
}

#[test]
fn verbose_prompt_shows_token_ids_on_stderr() {
    let model = test_model();
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "1",
        "--verbose-prompt",
        "--prompt",
        "hi",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    // SmolLM2's ChatML: <|im_start|> is id 1.
    assert!(
        stderr(&output).contains("1 -> \"<|im_start|>\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn missing_model_is_a_clear_error() {
    let output = run(&["--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert_fails_with(&output, "model file not found: /nonexistent/model.gguf");
}

#[test]
fn no_model_with_local_in_the_chain_names_both_flags() {
    // Issue 15: the model is needed only by `local`; the default chain has it.
    let output = Command::new(BIN)
        .env_remove("MISTRAL_BOT_MODEL")
        .env_remove("MISTRAL_BOT_CHAIN")
        .env_remove("TELEGRAM_BOT_TOKEN")
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .expect("the binary runs");
    assert_fails_with(&output, "--chain names `local` but no --model");
    assert_eq!(output.status.code(), Some(2));
    let output = run(&["--chain", "groq", "--prompt", "hi"]);
    assert_fails_with(
        &output,
        "--prompt answers with the local model: pass --model",
    );
}

#[test]
fn unreadable_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&["--model", dir.path().to_str().unwrap(), "--prompt", "hi"]);
    assert_fails_with(&output, "cannot read model file");
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"this is a text file, not a model").unwrap();
    let output = run(&["--model", file.path().to_str().unwrap(), "--prompt", "hi"]);
    assert_fails_with(&output, "is not a GGUF model file");
}

#[test]
fn a_gguf_llama_cpp_cannot_load_is_a_clear_error() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"GGUF\x03\x00\x00\x00garbage that is no model")
        .unwrap();
    let output = run(&["--model", file.path().to_str().unwrap(), "--prompt", "hi"]);
    assert_fails_with(&output, "llama.cpp could not load the model");
}

#[test]
fn zero_slots_is_refused() {
    let model = test_model();
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--slots",
        "0",
        "--prompt",
        "hi",
    ]);
    assert_fails_with(&output, "--slots must be at least 1");
}

#[test]
fn a_window_too_small_for_max_tokens_is_refused() {
    let model = test_model();
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--ctx-size",
        "256",
        "--max-tokens",
        "1000",
        "--prompt",
        "hi",
    ]);
    assert_fails_with(&output, "--max-tokens 1000 leaves too little room");
}

#[test]
fn ctx_size_beyond_training_warns_but_runs() {
    let model = test_model();
    // SmolLM2 was trained with 8192 tokens of context.
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--slots",
        "1",
        "--ctx-size",
        "16384",
        "--max-tokens",
        "4",
        "--prompt",
        "hi",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("beyond the context the model was trained with"),
        "{}",
        stderr(&output)
    );
}

/// `--repack`: llama.cpp repacks a Q4_0 model's weights at load for its CPU kernels (x86
/// with AVX2), and leaves them where they are with `--repack off`. The test model is Q4_1,
/// which is never repacked, so a Q4_0 copy of it is made first.
#[test]
fn repack_off_leaves_the_weights_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let q4_0 = dir.path().join("q4_0.gguf");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/requantize.py");
    let made = Command::new("python3")
        .args([
            script,
            test_model().to_str().unwrap(),
            q4_0.to_str().unwrap(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        made.status.success(),
        "the `gguf` package comes with scripts/setup.sh: {}",
        stderr(&made)
    );
    let repacked = |setting: &str| {
        let output = run(&[
            "--model",
            q4_0.to_str().unwrap(),
            "--slots",
            "1",
            "--max-tokens",
            "4",
            "--llama-log",
            "--repack",
            setting,
            "--prompt",
            "hi",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output).contains("CPU_REPACK model buffer size")
    };
    assert!(!repacked("off"), "--repack off");
    let avx2 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| info.contains(" avx2"));
    if cfg!(target_arch = "x86_64") && avx2 {
        assert!(repacked("on"), "llama.cpp repacks Q4_0 on x86 with AVX2");
    }
}

#[test]
fn an_unknown_chat_template_is_a_clear_error() {
    let model = test_model();
    let output = run(&[
        "--model",
        model.to_str().unwrap(),
        "--chat-template",
        "no-such-template",
        "--prompt",
        "hi",
    ]);
    assert_fails_with(&output, "chat template unusable");
}

#[test]
fn flags_come_from_the_environment_and_a_dotenv_file() {
    let model = test_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "MISTRAL_BOT_MODEL={}\nMISTRAL_BOT_TEMPERATURE=0\n",
            model.display()
        ),
    )
    .unwrap();
    let output = Command::new(BIN)
        .args([
            "--prompt",
            "What is the capital of France? Answer in one word.",
        ])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("MISTRAL_BOT_THREADS", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("Paris"), "{}", stdout(&output));

    // An environment variable is validated like its flag.
    let output = Command::new(BIN)
        .args(["--prompt", "hi"])
        .current_dir(dir.path())
        .env("MISTRAL_BOT_SLOTS", "0")
        .output()
        .unwrap();
    assert_fails_with(&output, "--slots must be at least 1");
}
