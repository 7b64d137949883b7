//! `/dashboard` in a real browser: the app over the real engine (SmolLM2, one thread) and
//! a failing fake Groq before it, a few completions, then the page opened in headless
//! Chromium (`scripts/setup.sh` installs it). The page writes what it drew into `data-*`
//! attributes, which `--dump-dom` shows after the page has polled its data.
//!
//! With `MISTRAL_BOT_DASHBOARD_SCREENSHOT=docs/dashboard.png` the test also drives a
//! longer, varied run (providers that answer, rate-limit and fail) and saves a screenshot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mistral_bot::config::ProviderKind::{Groq, Local};
use serde_json::Value;

use crate::util::app::{Fakes, TestApp, chain_app};
use crate::util::fake_provider::{Behavior, FakeProvider, Shape};

/// The Chromium binary: `$CHROMIUM`, else `chromium` (Debian) on the PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in ["chromium", "chromium-browser"] {
            let path = dir.join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("headless Chromium missing: run `bash scripts/setup.sh` (apt-get install chromium)");
}

/// What Chromium printed and produced for one page load.
struct PageLoad {
    dom: String,
    log: String,
}

/// Opens `url` in headless Chromium and lets the page run for `budget` of virtual time
/// (its polls included), then returns the DOM (`--dump-dom`) or takes a screenshot.
async fn load_page(url: &str, budget: Duration, screenshot: Option<(&Path, &str)>) -> PageLoad {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            // Chromium refuses to run as root with its sandbox (CI containers run as root).
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()));
    match screenshot {
        Some((path, window)) => command
            .arg(format!("--screenshot={}", path.display()))
            .arg(format!("--window-size={window}")),
        None => command.arg("--dump-dom").arg("--window-size=1280,1800"),
    };
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        command
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes")
    .expect("chromium runs");
    let load = PageLoad {
        dom: String::from_utf8_lossy(&output.stdout).into_owned(),
        log: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(output.status.success(), "chromium failed:\n{}", load.log);
    load
}

/// The page's console messages and uncaught errors. Chromium logs every console message
/// as `INFO:CONSOLE` whatever its level, and the page itself never logs, so any is a fault
/// (a script error, a CSP refusal, a resource that failed to load).
fn console_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .collect()
}

#[test]
fn console_errors_are_recognized_in_chromiums_log() {
    let log = "[1:1:1122/054116.913241:INFO:CONSOLE:1] \"boom\", source: x (1)\n\
               [1:1:1122/054116.915264:WARNING:gpu_init.cc(10)] unrelated\n";
    assert_eq!(console_errors(log).len(), 1);
}

/// The attributes of the element with `id="<id>"` in `dom`, as one string.
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let needle = format!("id=\"{id}\"");
    let at = dom
        .find(&needle)
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// The value of `attribute` on `#id`.
fn attribute(dom: &str, id: &str, attribute: &str) -> String {
    let tag = element(dom, id);
    let needle = format!("{attribute}=\"");
    let at = tag
        .find(&needle)
        .unwrap_or_else(|| panic!("#{id} has no {attribute}: {tag}"))
        + needle.len();
    tag[at..at + tag[at..].find('"').unwrap()].to_string()
}

/// The text inside `#id` (tags removed).
fn text(dom: &str, id: &str) -> String {
    let tag = element(dom, id);
    let start = dom.find(tag).unwrap() + tag.len();
    let inner = &dom[start..start + dom[start..].find("</").unwrap()];
    inner.to_string()
}

/// The cells of the table row that starts with `provider` in `#table`.
fn row(dom: &str, table: &str, provider: &str) -> Vec<String> {
    let start = dom.find(&format!("id=\"{table}\"")).unwrap();
    let body = &dom[start..start + dom[start..].find("</table>").unwrap()];
    for tr in body.split("<tr>").skip(1) {
        let cells: Vec<String> = tr
            .split("<td")
            .skip(1)
            .map(|cell| {
                let cell = cell.split("</td>").next().unwrap();
                let cell = &cell[cell.find('>').unwrap() + 1..];
                // Drop inner tags (the colour dot).
                let mut out = String::new();
                let mut in_tag = false;
                for c in cell.chars() {
                    match c {
                        '<' => in_tag = true,
                        '>' => in_tag = false,
                        c if !in_tag => out.push(c),
                        _ => {}
                    }
                }
                out
            })
            .collect();
        if cells.first().map(String::as_str) == Some(provider) {
            return cells;
        }
    }
    panic!("no row {provider} in #{table}:\n{body}");
}

/// Waits until the dashboard's history holds a sample counting `requests` local attempts
/// in all (the sampler runs every 5 s).
async fn wait_for_samples(app: &TestApp, requests: u64) -> Value {
    for _ in 0..200 {
        let (status, body) = app.get_json("/dashboard/data").await;
        assert_eq!(status, 200, "{body}");
        let series = &body["series"];
        let local = series["providers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|p| p == "local")
            .unwrap();
        let counted: u64 = series["requests"][local]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        if counted >= requests && series["t"].as_array().unwrap().len() >= 2 {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the dashboard never sampled {requests} local requests");
}

async fn ask_many(app: &TestApp, n: usize) {
    for i in 0..n {
        let (status, provider, body) = app.ask(&format!("Say hello number {i}.")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(provider.as_deref(), Some("local"), "{body}");
    }
}

/// Every chart of the page, by element id.
const CHARTS: [&str; 8] = [
    "c-tps",
    "c-slots",
    "c-cache",
    "c-park",
    "c-first",
    "c-reply",
    "c-requests",
    "c-rss",
];

#[tokio::test]
async fn dashboard_renders_live_charts_in_a_real_browser() {
    let groq = FakeProvider::start(Shape::OpenAi, Behavior::ServerError).await;
    let fakes = Fakes {
        groq: Some(groq),
        ..Fakes::default()
    };
    let app = chain_app(&[Groq, Local], &fakes).await;
    let url = format!("{}/dashboard", app.base);

    // Three failures open Groq's breaker; the local engine answers all three.
    ask_many(&app, 3).await;
    let data = wait_for_samples(&app, 3).await;
    assert_eq!(
        data["now"]["chain"],
        serde_json::json!(["groq", "local", "canned"])
    );
    assert_eq!(
        data["now"]["health"][0]["breaker"], "open",
        "{}",
        data["now"]
    );
    let secret_free = data.to_string();
    assert!(!secret_free.contains(crate::util::fake_provider::FAKE_KEY));

    let first = load_page(&url, Duration::from_secs(6), None).await;
    let errors = console_errors(&first.log);
    assert!(errors.is_empty(), "console errors:\n{}", errors.join("\n"));
    let dom = &first.dom;
    assert!(
        attribute(dom, "status", "class").contains("live"),
        "{}",
        element(dom, "status")
    );
    for id in CHARTS {
        let points: usize = attribute(dom, id, "data-points").parse().unwrap();
        assert!(points >= 2, "#{id} drew {points} points");
        let start = dom.find(&format!("id=\"{id}\"")).unwrap();
        let chart = &dom[start..start + dom[start..].find("</section>").unwrap()];
        assert!(chart.contains("<canvas"), "#{id} has no canvas: {chart}");
    }
    for id in ["c-tps", "c-requests", "c-reply", "c-first", "c-rss"] {
        let max: f64 = attribute(dom, id, "data-max").parse().unwrap();
        assert!(max > 0.0, "#{id} shows only zeros");
    }
    assert!(dom.contains("http_5xx"), "errors by kind miss Groq's 5xx");
    assert_eq!(row(dom, "t-health", "groq")[1], "open");
    assert_eq!(text(dom, "f-chain"), "groq → local → canned");
    assert!(
        text(dom, "f-model").to_lowercase().contains("smollm2"),
        "{}",
        text(dom, "f-model")
    );
    let local_before = row(dom, "t-providers", "local");
    assert_eq!(local_before[1], "3", "{local_before:?}");

    // More traffic: the second load shows it.
    ask_many(&app, 2).await;
    wait_for_samples(&app, 5).await;
    let second = load_page(&url, Duration::from_secs(6), None).await;
    let errors = console_errors(&second.log);
    assert!(errors.is_empty(), "console errors:\n{}", errors.join("\n"));
    let local_after = row(&second.dom, "t-providers", "local");
    assert_eq!(local_after[1], "5", "{local_after:?}");
    let points = |dom: &str| -> usize { attribute(dom, "c-tps", "data-points").parse().unwrap() };
    assert!(
        points(&second.dom) > points(&first.dom),
        "no new samples drawn"
    );
    assert_ne!(text(&second.dom, "f-uptime"), text(dom, "f-uptime"));

    if let Some(path) = std::env::var_os("MISTRAL_BOT_DASHBOARD_SCREENSHOT") {
        screenshot_run(&app, &fakes, Path::new(&path)).await;
    }
}

/// The longer run behind the README's screenshot: Groq fails (breaker opens), the local
/// engine answers bursts of parallel chats, Groq comes back, then rate-limits.
async fn screenshot_run(app: &TestApp, fakes: &Fakes, path: &Path) {
    let groq = fakes.groq.as_ref().unwrap();
    let burst = |n: usize| async move {
        let asks = (0..n).map(|i| async move {
            app.post_chat(&serde_json::json!({
                "model": "any",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant who writes short stories."},
                    {"role": "user", "content": format!("Tell a story about robot number {i}.")},
                ],
                "temperature": 0,
                "max_tokens": 120,
            }))
            .await
        });
        futures::future::join_all(asks).await;
    };
    for round in 0..6 {
        burst(4).await;
        tokio::time::sleep(Duration::from_secs(3 + round % 3)).await;
    }
    // Groq answers again once its breaker lets a probe through (30 s cool-down).
    groq.set(Behavior::answer(&["Hello", " from", " Groq."]));
    tokio::time::sleep(Duration::from_secs(26)).await;
    for _ in 0..8 {
        app.ask("Hi!").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    groq.set(Behavior::RateLimited {
        retry_after_secs: 40,
    });
    for _ in 0..4 {
        burst(3).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let url = format!("{}/dashboard", app.base);
    // The same page on a phone-sized screen, beside it.
    let phone = path.with_file_name(format!(
        "{}-phone.png",
        path.file_stem().unwrap().to_string_lossy()
    ));
    for (path, window) in [(path.to_path_buf(), "1280,2000"), (phone, "390,2400")] {
        let load = load_page(&url, Duration::from_secs(5), Some((&path, window))).await;
        let errors = console_errors(&load.log);
        assert!(errors.is_empty(), "console errors:\n{}", errors.join("\n"));
    }
}
